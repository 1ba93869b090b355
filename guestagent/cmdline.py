"""What both command lines share: one-line errors for bad arguments and failures.

`guestagent` (guestagent.cli) and `guestagent-host` (guestagent.host.cli) both
run their subcommands through ``dispatch``; this module is shipped to guests and
hosts alike, so it imports neither side.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Callable, NoReturn

from guestagent.errors import GuestagentError


class Parser(argparse.ArgumentParser):
    """argparse with a bad argument reported in one line (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        from guestagent.display import escape

        self.exit(2, f"{self.prog}: error: {escape(message)} (see {self.prog} --help)\n")


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                prog: str) -> int:
    """Run a handler, turning expected failures into one line on stderr."""
    from guestagent.display import escape

    try:
        code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except GuestagentError as err:
        print(f"{prog}: error: {escape(err)}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and point stdout at
        # /dev/null so the interpreter's final flush has nothing to complain of.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PermissionError as err:
        print(f"{prog}: error: permission denied: {escape(err.filename or err)}",
              file=sys.stderr)
        return 1
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"{prog}: error: {escape(err.strerror or err)}{escape(where)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse argv and run the chosen subcommand's handler (help when none is chosen)."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.func, args, parser.prog)


