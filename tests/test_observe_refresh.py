"""Targeted refresh: a scheduler-change wake-up re-reads just the threads it names."""

from __future__ import annotations

import errno
import os
import select
import threading
import time

import pytest
from helpers.threads import Sleeper, real_time_parent, sched_thread
from helpers.tracefs import syscalls_only_tracefs

from guestagent.observe import EVENT_BATCH, Observer
from guestagent.observe.events import ProcEvent
from guestagent.observe.kernel import LiveKernel
from guestagent.observe.schedwatch import SchedWatch
from guestagent.observe.threads import ThreadTable

pytestmark = pytest.mark.root


@pytest.fixture
def observer(tracefs):  # noqa: F811
    with Observer() as obs:
        obs.snapshot(time.monotonic())
        assert obs.changes_watched, "the scheduler watch should be open"
        yield obs


def pump(obs: Observer, timeout: float = 2.0):
    """Handle readable fds until refresh() yields a snapshot (or time runs out)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for fd in select.select(obs.fds(), [], [], 0.05)[0]:
            obs.handle_readable(fd)
        snap = obs.refresh(time.monotonic())
        if snap is not None:
            return snap
    return None


def find(snap, tid):
    return next((t for t in snap.threads if t.tid == tid), None)


def test_a_policy_change_shows_without_a_sweep(observer):
    target = Sleeper()
    try:
        pump(observer, 0.2)  # let the connector report the new thread
        observer.snapshot(time.monotonic(), full=False)
        started = time.monotonic()
        os.sched_setscheduler(target.tid, os.SCHED_FIFO, os.sched_param(7))
        snap = pump(observer)
        assert snap is not None and time.monotonic() - started < 1.0
        info = find(snap, target.tid)
        assert info is not None and info.rt_priority == 7 and info.policy.name == "FIFO"
        os.sched_setscheduler(target.tid, os.SCHED_OTHER, os.sched_param(0))
        snap = pump(observer)
        assert snap is not None and find(snap, target.tid) is None, "no longer matters"
    finally:
        target.end()


def test_a_change_to_nothing_new_yields_no_snapshot(observer):
    me = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me))
    assert pump(observer, 0.3) is None


def test_an_exit_of_a_thread_that_mattered_shows_without_a_sweep(observer):
    with sched_thread(os.SCHED_FIFO, 9) as rt:
        pump(observer, 0.2)
        observer.snapshot(time.monotonic(), full=False)
        while pump(observer, 0.2) is not None:  # other work's changes, if any
            pass
    snap = pump(observer, 10.0)  # the thread was joined: its exit event is queued
    assert snap is not None, "the exit of a FIFO thread must yield a snapshot"
    assert find(snap, rt.tid) is None


def churn(stop: threading.Event, every: float = 0.01) -> None:
    """Other work: a short-lived thread born and gone every ``every`` seconds."""
    while not stop.wait(every):
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()


def test_other_works_forks_and_exits_are_read_in_batches(observer):
    # As the agent's loop runs the observer: poll its fds until its deadline, then
    # check_changes(); count the times other work's births and deaths woke it.
    with sched_thread(os.SCHED_FIFO, 9):
        observer.snapshot(time.monotonic(), full=False)
        assert observer.batching, "every thread whose exit matters has a pidfd"
        stop = threading.Event()
        worker = threading.Thread(target=churn, args=(stop,), daemon=True)
        worker.start()
        wakeups, events = 0, observer.events_fd
        start = time.monotonic()
        end = start + 4 * EVENT_BATCH
        try:
            while (now := time.monotonic()) < end:
                due = observer.deadline()
                wait = max(0.0, min(end, due if due is not None else end) - now)
                readable = select.select(observer.fds(), [], [], wait)[0]
                for fd in readable:
                    observer.handle_readable(fd)
                now = time.monotonic()
                due = observer.deadline()
                if events in readable or (due is not None and now >= due):
                    wakeups += 1
                    observer.check_changes(now)
                observer.refresh(now)
        finally:
            stop.set()
            worker.join()
        elapsed = time.monotonic() - start
    # ~100 births and as many exits a second (one wake-up each, before): now read once
    # per EVENT_BATCH, twice where a batch found nothing (the churn starved on a busy
    # machine) and the next event opened a new one
    assert wakeups <= 2 * elapsed / EVENT_BATCH + 2, (wakeups, elapsed)


def open_batch(observer: Observer) -> None:
    """With a real-time thread watched, read a birth and a death: the connector closes."""
    pump(observer, 0.2)
    observer.snapshot(time.monotonic(), full=False)
    assert observer.batching
    Sleeper().end()
    observer.handle_readable(observer.events_fd)
    assert observer.events_fd not in observer.fds(), "the batch is open"


def test_the_exit_of_a_real_time_thread_is_seen_while_events_are_batched(observer):
    with sched_thread(os.SCHED_FIFO, 9) as rt:
        open_batch(observer)
    # Joined: only the thread's pidfd can say so now (check_changes is never called,
    # so the batch never ends).
    snap = None
    end = time.monotonic() + 10
    while snap is None and time.monotonic() < end:
        for fd in select.select(observer.fds(), [], [], 1.0)[0]:
            observer.handle_readable(fd)
        snap = observer.refresh(time.monotonic())
    assert snap is not None and find(snap, rt.tid) is None


def test_a_newborn_that_sets_its_own_policy_is_shown_while_its_fork_event_waits(observer):
    with sched_thread(os.SCHED_FIFO, 9):
        open_batch(observer)
        with sched_thread(os.SCHED_FIFO, 8) as newborn:
            snap = pump(observer, 10.0)
            while snap is not None and find(snap, newborn.tid) is None:
                snap = pump(observer, 10.0)  # other work's changes first, if any
            assert snap is not None and find(snap, newborn.tid).rt_priority == 8


def test_a_thread_born_real_time_is_shown_while_its_fork_event_waits(observer):
    # It calls nothing the syscall wake-ups see; pump() never ends the batch, so only
    # the newborn wake-up can show it (and the refresh then reads its fork event).
    with sched_thread(os.SCHED_FIFO, 9), real_time_parent(7) as parent:
        open_batch(observer)
        child = parent.spawn()
        try:
            snap = pump(observer, 10.0)
            while snap is not None and find(snap, child.tid) is None:
                snap = pump(observer, 10.0)  # other work's changes first, if any
            assert snap is not None and find(snap, child.tid).rt_priority == 7
        finally:
            child.end()


def test_a_sweep_reads_the_batch_and_starts_the_next(observer):
    with sched_thread(os.SCHED_FIFO, 9):
        open_batch(observer)
        Sleeper().end()  # queued for the sweep
        swept_at = time.monotonic()
        observer.snapshot(swept_at, full=False)
        observer.check_changes(time.monotonic())  # the newborns' one look, now due
        assert observer.events_fd not in observer.fds(), "still batching"
        due = observer.deadline()
        assert due is not None and due >= swept_at + EVENT_BATCH, \
            "the batch ends EVENT_BATCH after the sweep that read it, not after the read before"


def test_only_a_thread_that_named_its_own_process_is_adopted():
    table = ThreadTable(LiveKernel(), watch=False)
    try:
        table.apply([ProcEvent("fork", 500, 500, parent_tid=1)])
        assert table.adopt({500}, {500: 500}), "known, same process"
        assert table.adopt({600}, {600: 42}), "unknown: placed in the process named"
        assert len(table) == 2
        assert not table.adopt({500}, {500: 77}), "a reused tid: its old exit is queued"
        assert not table.adopt({700}, {}), "named by another thread: its process is unknown"
        assert len(table) == 2
    finally:
        table.close()


class KernelWithoutThreadPidfds(LiveKernel):
    """This machine as a kernel before 6.9 sees it: pidfd_open refuses PIDFD_THREAD."""

    def exit_watch(self, tid: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")


def test_without_thread_pidfds_events_are_read_at_once(tracefs):  # noqa: F811
    with Observer(kernel=KernelWithoutThreadPidfds()) as obs, sched_thread(os.SCHED_FIFO, 9):
        obs.snapshot(time.monotonic())
        assert obs.changes_watched and not obs.batching
        Sleeper().end()
        obs.handle_readable(obs.events_fd)
        assert obs.events_fd in obs.fds(), "no batch: the connector stays polled"


class KernelWithoutNewbornWatch(LiveKernel):
    """A kernel whose tracefs lacks sched:sched_wakeup_new: births stay unnamed."""

    def __init__(self, roots: list[str]) -> None:
        super().__init__()
        self.roots = roots

    def sched_watch(self, cpus: frozenset[int]) -> SchedWatch:
        return SchedWatch(cpus, roots=self.roots)


def test_without_the_newborn_watch_events_are_read_at_once(tracefs, tmp_path):  # noqa: F811
    # a thread born real-time would otherwise wait for the batch
    kernel = KernelWithoutNewbornWatch([syscalls_only_tracefs(tracefs, tmp_path)])
    with Observer(kernel=kernel) as obs, sched_thread(os.SCHED_FIFO, 9):
        obs.snapshot(time.monotonic())
        assert obs.changes_watched and not obs.batching
        Sleeper().end()
        obs.handle_readable(obs.events_fd)
        assert obs.events_fd in obs.fds(), "no batch: the connector stays polled"
