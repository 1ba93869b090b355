"""A bound on a guest's life: kill QEMU when the guest has run too long or is stuck.

Every wait on a guest has its own timeout, but a guest that hangs makes each later
test wait its timeout out in turn: with a few dozen tests that is hours. The
watchdog ends such a guest at once, so the tests after it fail fast, each naming
why (``reason``):

- the guest ran longer than ``lifetime`` seconds (the bound on one guest's
  boot and tests together), or
- its kernel reports a soft lockup, a vCPU stuck for ``stuck`` seconds or more
  (``watchdog: BUG: soft lockup - CPU#1 stuck for 130s!`` on the console). A short
  one can be a slow host; minutes of it are a hung guest.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

SOFT_LOCKUP = re.compile(rb"soft lockup - CPU#(\d+) stuck for (\d+)s")


def stuck_seconds(console: bytes) -> int:
    """The longest soft lockup the kernel reported in this console text (0: none)."""
    return max((int(m.group(2)) for m in SOFT_LOCKUP.finditer(console)), default=0)


class GuestWatchdog:
    """Watches one QEMU process (the leader of its own process group) and its console."""

    def __init__(self, proc: subprocess.Popen, console: Path, lifetime: float,
                 stuck: int = 120, poll: float = 2.0) -> None:
        self.proc, self.console = proc, console
        self.lifetime, self.stuck, self.poll = lifetime, stuck, poll
        self.reason: str | None = None  # set when the watchdog killed the guest
        self._stop = threading.Event()
        self._offset = 0  # console bytes already scanned
        self._tail = b""  # an incomplete last line, scanned again with what follows
        self._thread = threading.Thread(target=self._watch, name="guest-watchdog",
                                        daemon=True)

    def start(self) -> GuestWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _new_console(self) -> bytes:
        try:
            with open(self.console, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return b""
        self._offset += len(data)
        text, _, self._tail = (self._tail + data).rpartition(b"\n")
        return text

    def check(self, elapsed: float) -> str | None:
        """Why the guest must be stopped now, or None."""
        if elapsed > self.lifetime:
            return (f"the guest ran {elapsed:.0f} s, longer than the {self.lifetime:.0f} s "
                    "its boot and tests may take")
        stuck = stuck_seconds(self._new_console())
        if stuck >= self.stuck:
            return f"the guest kernel reports a vCPU stuck for {stuck} s (soft lockup)"
        return None

    def _watch(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.poll) and self.proc.poll() is None:
            reason = self.check(time.monotonic() - started)
            if reason is not None:
                self.reason = reason
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
