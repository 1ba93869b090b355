"""Scheduler-change wake-ups and their target threads, from real syscalls."""

from __future__ import annotations

import os
import select
import threading
import time

import pytest
from helpers.threads import Sleeper, real_time_parent
from helpers.tracefs import syscalls_only_tracefs

from guestagent.observe.schedwatch import SchedWatch

pytestmark = pytest.mark.root


@pytest.fixture
def watch(tracefs):
    w = SchedWatch(os.sched_getaffinity(0))
    w.read()
    yield w
    w.close()


def changes_after(w: SchedWatch, action, timeout: float = 2.0):
    """Run `action` in a fresh thread; (its tid, seconds to the wake-up or None, changes)."""
    w.read()
    poller = select.poll()
    for fd in w.fds():
        poller.register(fd, select.POLLIN)
    done, info = threading.Event(), {}

    def body():
        info["tid"], info["at"] = threading.get_native_id(), time.monotonic()
        action()
        done.wait(5)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    ready = poller.poll(timeout * 1000)
    woke = time.monotonic()
    time.sleep(0.05)  # let every CPU's ring take its records
    changes = w.read()
    done.set()
    t.join()
    return info["tid"], (woke - info["at"]) if ready else None, changes


@pytest.mark.parametrize("action", [
    lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(3)),
    lambda: os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0)),
    lambda: os.setpriority(os.PRIO_PROCESS, 0, 5),
    lambda: os.sched_setaffinity(0, {0}),
    lambda: os.sched_setparam(0, os.sched_param(0)),
], ids=["fifo", "batch", "nice", "affinity", "setparam"])
def test_a_thread_changing_itself_is_named(watch, action):
    tid, latency, changes = changes_after(watch, action)
    assert latency is not None and latency < 1.0, "no wake-up"
    assert tid in changes.tids and not changes.everything
    assert changes.owners.get(tid) == os.getpid(), "the caller's process is the owner"


def test_the_target_is_named_not_the_caller(watch):
    target = Sleeper()
    try:
        caller, _, changes = changes_after(
            watch, lambda: os.sched_setscheduler(target.tid, os.SCHED_RR, os.sched_param(2)))
        assert target.tid in changes.tids and caller not in changes.tids
        assert target.tid not in changes.owners, "only a thread changing itself is owned"
        _, _, changes = changes_after(
            watch, lambda: os.setpriority(os.PRIO_PROCESS, target.tid, 3))
        assert target.tid in changes.tids
    finally:
        target.end()


def test_a_process_group_change_asks_for_a_sweep(watch):
    pgrp = os.getpgrp()
    nice = os.getpriority(os.PRIO_PGRP, pgrp)
    _, _, changes = changes_after(watch, lambda: os.setpriority(os.PRIO_PGRP, pgrp, nice))
    assert changes.everything


def test_unrelated_syscalls_are_not_recorded(watch):
    # The watch is system-wide: other work on a shared machine may wake it meanwhile, so
    # the check is that this thread's reading syscall left no record, not that no wake-up came.
    tid, _, changes = changes_after(
        watch, lambda: os.getpriority(os.PRIO_PROCESS, 0), timeout=0.3)
    assert tid not in changes.tids


def test_a_thread_born_real_time_is_named(watch):
    # It calls nothing: the scheduler's first wake-up of a real-time newborn names it.
    assert watch.newborns, "sched:sched_wakeup_new with a prio filter should open"
    with real_time_parent(6) as parent:
        watch.read()  # the parent's own policy change
        poller = select.poll()
        for fd in watch.fds():
            poller.register(fd, select.POLLIN)
        child = parent.spawn()
        try:
            assert poller.poll(2000), "no wake-up"
            time.sleep(0.05)  # let every CPU's ring take its records
            changes = watch.read()
            assert child.tid in changes.tids and not changes.everything
            assert child.tid not in changes.owners, "a newborn's process is not known"
        finally:
            child.end()


def test_a_thread_born_with_no_real_time_policy_is_not_recorded(watch):
    # changes_after starts a thread that does nothing: a birth the kernel's filter drops
    tid, _, changes = changes_after(watch, lambda: None, timeout=0.3)
    assert tid not in changes.tids


def test_without_the_newborn_tracepoint_changes_are_still_named(tracefs, tmp_path):
    w = SchedWatch(os.sched_getaffinity(0), roots=[syscalls_only_tracefs(tracefs, tmp_path)])
    try:
        assert not w.newborns, "births are left to the caller"
        tid, latency, changes = changes_after(
            w, lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(3)))
        assert latency is not None and tid in changes.tids
    finally:
        w.close()


def test_nothing_changed_reads_empty(watch):
    changes = watch.read()
    assert not changes.tids and not changes.everything


def test_without_tracefs_it_says_what_is_missing():
    with pytest.raises(OSError, match="is tracefs mounted"):
        SchedWatch({0}, roots=["/nonexistent"])


def test_records_wrapping_the_ring_end_parse(watch):
    """Batches of changes, each most of a ring, so later ones wrap around its end."""
    me = threading.get_native_id()
    for _ in range(3):
        for _ in range(200):  # 400 samples of 48 or 64 bytes: about 22 KiB of 32
            os.setpriority(os.PRIO_PROCESS, me, 0)
        time.sleep(0.05)
        changes = watch.read()
        assert me in changes.tids and not changes.everything


def test_a_flood_beyond_the_ring_asks_for_a_sweep(watch):
    me = threading.get_native_id()
    for _ in range(2000):
        os.setpriority(os.PRIO_PROCESS, me, 0)
    time.sleep(0.05)
    assert watch.read().everything
