"""The guest watchdog of the image tests (testbed/watchdog.py), on a real process.

QEMU's place is taken by `sleep` in its own process group: what is checked is that
the watchdog reads the console and kills the group, which does not need a guest.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.systemd_vm import SystemdGuest
from testbed.vm import VMError
from testbed.watchdog import GuestWatchdog, stuck_seconds

LOCKUP = (b"[  125.509373] watchdog: BUG: soft lockup - CPU#0 stuck for %ds! "
          b"[(udev-worker):120]\n")


@pytest.fixture
def proc() -> Iterator[subprocess.Popen]:
    p = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def wait_exit(p: subprocess.Popen, timeout: float = 30.0) -> int | None:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def test_stuck_seconds_is_the_longest_lockup() -> None:
    text = b"boot\n" + LOCKUP % 22 + b"rcu: INFO\n" + LOCKUP % 148 + LOCKUP % 48
    assert stuck_seconds(text) == 148
    assert stuck_seconds(b"[    1.0] Linux version 6.1.0\n") == 0


def test_a_long_soft_lockup_kills_the_guest(proc: subprocess.Popen, tmp_path: Path) -> None:
    console = tmp_path / "serial.log"
    console.write_bytes(b"[    0.0] Linux version\n" + LOCKUP % 22)
    dog = GuestWatchdog(proc, console, lifetime=600, stuck=120, poll=0.05).start()
    try:
        time.sleep(0.5)  # ten polls: a short lockup is a slow host, not a hung guest
        assert proc.poll() is None and dog.reason is None
        with open(console, "ab") as f:  # the line arrives in two writes
            f.write((LOCKUP % 130)[:40])
            f.flush()
            time.sleep(0.2)
            f.write((LOCKUP % 130)[40:])
        assert wait_exit(proc) is not None
        assert dog.reason == "the guest kernel reports a vCPU stuck for 130 s (soft lockup)"
    finally:
        dog.stop()


def test_a_guest_past_its_lifetime_is_killed(proc: subprocess.Popen, tmp_path: Path) -> None:
    dog = GuestWatchdog(proc, tmp_path / "no-console-yet", lifetime=0.3, poll=0.05).start()
    try:
        assert wait_exit(proc) is not None
        assert dog.reason is not None and "longer than the 0 s" in dog.reason
    finally:
        dog.stop()


def test_stopped_watchdog_leaves_the_guest_alone(proc: subprocess.Popen,
                                                 tmp_path: Path) -> None:
    dog = GuestWatchdog(proc, tmp_path / "serial.log", lifetime=0.3, poll=0.05).start()
    dog.stop()
    time.sleep(0.5)
    assert proc.poll() is None and dog.reason is None


def test_every_command_on_a_killed_guest_fails_with_the_reason(proc: subprocess.Popen,
                                                               tmp_path: Path) -> None:
    vm = SystemdGuest(None, None, tmp_path)  # type: ignore[arg-type]  # never booted
    vm.serial_log.write_bytes(LOCKUP % 130)
    vm.watchdog = GuestWatchdog(proc, vm.serial_log, lifetime=600, poll=0.05).start()
    try:
        assert wait_exit(proc) is not None
        for _ in range(2):  # at once, each time: no command waits for a reply
            with pytest.raises(VMError, match="harness watchdog: the guest kernel reports a "
                               "vCPU stuck for 130 s") as err:
                vm.run(["true"], timeout=600)
            assert "soft lockup - CPU#0 stuck for 130s" in str(err.value)  # the console tail
    finally:
        vm.watchdog.stop()
