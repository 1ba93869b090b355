"""Log lines of the host service, each with a journald priority.

Under systemd (JOURNAL_STREAM set) a line is `<N>message`, which journald reads
as the priority, as the guest agent does; on a terminal it is
`guestagent-host: message`. Callers that say nothing get INFO, or WARNING for a
line that reports something the host could not do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TextIO

ERR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7


def default_priority(msg: str) -> int:
    return WARNING if ("cannot " in msg or "refused" in msg) else INFO


class HostLog:
    """Callable as the peers' Log (msg) and with an explicit priority (msg, priority)."""

    def __init__(self, verbose: bool = False, stream: TextIO | None = None,
                 environ: Mapping[str, str] = os.environ) -> None:
        self.verbose = verbose
        self.stream = stream
        self.journal = bool(environ.get("JOURNAL_STREAM"))

    def __call__(self, msg: str, priority: int | None = None) -> None:
        prio = default_priority(msg) if priority is None else priority
        # A vCPU change is routine: shown with -v, kept at DEBUG otherwise.
        if prio >= INFO and msg.startswith(("vCPU ", "emulator thread:")) and "asked" not in msg:
            if not self.verbose:
                return
            prio = DEBUG
        line = msg.replace("\n", "\\n")
        text = f"<{prio}>{line}" if self.journal else f"guestagent-host: {line}"
        print(text, file=self.stream or sys.stderr, flush=True)
