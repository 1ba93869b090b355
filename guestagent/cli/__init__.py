"""The `guestagent` command line: one subcommand module per area.

Each module in AREAS defines ``register(subparsers)``, which adds its
subcommands and sets ``func`` on each; ``func(args)`` returns the exit code.
Heavy imports stay inside the handlers so ``--help`` and ``--version`` are fast.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from guestagent import __version__
from guestagent.cmdline import Parser, dispatch, run_command

__all__ = ["AREAS", "Parser", "build_parser", "dispatch", "main", "run_command"]

AREAS = ("guestagent.cli.observe", "guestagent.cli.agent", "guestagent.cli.cloudinit")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="guestagent",
        description="Tell the hypervisor host what the guest's scheduler knows.",
    )
    parser.add_argument("--version", action="version", version=f"guestagent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser(), argv)
