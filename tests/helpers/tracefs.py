"""Tracefs trees for tests of the scheduler watch."""

from __future__ import annotations

from pathlib import Path

from guestagent.observe.schedwatch import WATCHED


def syscalls_only_tracefs(real_root: str, into: Path) -> str:
    """A copy of the watched syscalls' tracepoints from ``real_root`` (their real ids)
    and nothing else: tracefs as a kernel without the newborn tracepoint shows it."""
    for call in WATCHED:
        for name in (f"sys_enter_{call}", f"sys_exit_{call}"):
            point = into / "events" / "syscalls" / name
            point.mkdir(parents=True)
            for part in ("id", "format"):
                with open(f"{real_root}/events/syscalls/{name}/{part}") as f:
                    (point / part).write_text(f.read())
    return str(into)
