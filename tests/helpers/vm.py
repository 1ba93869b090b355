"""Skipping, with the reason, where a QEMU guest cannot boot on this machine."""

from __future__ import annotations

import pytest

from testbed.vm import missing_components


def require_vm() -> None:
    """Skip, naming exactly what is missing, where a guest cannot boot on this machine."""
    missing = missing_components()
    if missing:
        pytest.skip("VM tests need " + "; ".join(missing))
