"""Read-only views of the guest: tasks, irqs, cpus."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Filled in by the observation core."""
