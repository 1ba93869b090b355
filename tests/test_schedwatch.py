"""Scheduler-change wake-ups from syscall tracepoints, with real syscalls."""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time

import pytest

from guestagent.observe.schedwatch import TRACEFS, SchedWatch


@pytest.fixture(scope="module")
def tracefs():
    """systemd mounts tracefs at boot; where init did not (this CI machine), mount it."""
    if not any(os.path.exists(f"{root}/events") for root in TRACEFS):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS[0]], check=True)
    return TRACEFS[0]


@pytest.fixture
def watch(tracefs):
    w = SchedWatch(os.sched_getaffinity(0))
    drain_all(w)
    yield w
    w.close()


def drain_all(w: SchedWatch) -> bool:
    return any([w.drain(fd) for fd in w.fds()])


def woken_by(w: SchedWatch, action, timeout: float = 2.0) -> float | None:
    """Run `action` in a thread; seconds until a ring buffer became readable, or None."""
    drain_all(w)
    poller = select.poll()
    for fd in w.fds():
        poller.register(fd, select.POLLIN)
    done = threading.Event()
    started = []

    def body():
        started.append(time.monotonic())
        action()
        done.wait(5)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    ready = poller.poll(timeout * 1000)
    woke = time.monotonic()
    done.set()
    t.join()
    if not ready:
        return None
    assert any(w.drain(fd) for fd, _ in ready)
    return woke - started[0]


@pytest.mark.parametrize("action", [
    lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(3)),
    lambda: os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0)),
    lambda: os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5),
    lambda: os.sched_setaffinity(0, {0}),
    lambda: os.sched_setparam(0, os.sched_param(0)),
], ids=["fifo", "batch", "nice", "affinity", "setparam"])
def test_a_scheduling_change_wakes_the_watch(watch, action):
    latency = woken_by(watch, action)
    assert latency is not None, "no wake-up"
    assert latency < 1.0


def test_unrelated_syscalls_do_not_wake_it(watch):
    assert woken_by(watch, lambda: os.getpriority(os.PRIO_PROCESS, 0), timeout=0.3) is None


def test_draining_an_idle_ring_reports_nothing(watch):
    assert not drain_all(watch)


def test_without_tracefs_it_says_what_is_missing():
    with pytest.raises(OSError, match="is tracefs mounted"):
        SchedWatch({0}, roots=["/nonexistent"])
