"""The cheap sweep (full=False), nice rotation, kept stat fds and young-thread checks,
on real threads of this machine."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from helpers.threads import SchedThread, sched_thread

from guestagent.observe import Observer
from guestagent.observe.irqs import IrqInfo, with_irq_threads
from guestagent.observe.kernel import LiveKernel, StatReader
from guestagent.observe.threads import NICE_ROTATION, ThreadInfo, ThreadTable
from guestagent.observe.young import YoungThreads
from guestagent.protocol.model import SchedClass

pytestmark = pytest.mark.root


def find(threads, tid):
    return next((t for t in threads if t.tid == tid), None)


@pytest.fixture
def table():
    t = ThreadTable(LiveKernel(), watch=False)  # rescan each sweep: no event timing in play
    yield t
    t.close()


def test_nice_of_a_known_thread_is_seen_within_the_rotation(table):
    with sched_thread(os.SCHED_OTHER) as t:
        table.sweep()
        assert find(table.sweep(full=False)[0], t.tid) is None
        os.setpriority(os.PRIO_PROCESS, t.tid, 6)
        seen = [find(table.sweep(full=False)[0], t.tid) for _ in range(NICE_ROTATION)]
        hit = next(i for i in seen if i is not None)
        assert (hit.nice, hit.policy) == (6, SchedClass.OTHER)
        # from now on it matters: a change is seen at the next sweep, and 0 drops it
        os.setpriority(os.PRIO_PROCESS, t.tid, 3)
        assert find(table.sweep(full=False)[0], t.tid).nice == 3
        os.setpriority(os.PRIO_PROCESS, t.tid, 0)
        assert find(table.sweep(full=False)[0], t.tid) is None


def test_new_thread_has_its_nice_read_at_its_first_sweep(table):
    table.sweep()
    with sched_thread(os.SCHED_OTHER, nice=-4) as t:
        info = find(table.sweep(full=False)[0], t.tid)
        assert info is not None and info.nice == -4


def test_rt_priority_change_is_seen_without_a_full_sweep(table):
    with sched_thread(os.SCHED_FIFO, 10) as t:
        table.sweep()
        os.sched_setscheduler(t.tid, os.SCHED_FIFO, os.sched_param(20))
        info = find(table.sweep(full=False)[0], t.tid)
        assert (info.policy, info.rt_priority) == (SchedClass.FIFO, 20)
        os.sched_setscheduler(t.tid, os.SCHED_RR, os.sched_param(20))
        assert find(table.sweep(full=False)[0], t.tid).policy == SchedClass.RR
        os.sched_setscheduler(t.tid, os.SCHED_OTHER, os.sched_param(0))
        assert find(table.sweep(full=False)[0], t.tid) is None


def test_verified_detail_is_reused_until_a_full_sweep(table):
    """A niced user thread at OTHER is verified by syscalls; its detail object stays
    the same between full sweeps, and a nice change is still seen at once."""
    with sched_thread(os.SCHED_OTHER, nice=-3) as t:
        first = find(table.sweep()[0], t.tid)
        assert first is not None and first.nice == -3
        again = find(table.sweep(full=False)[0], t.tid)
        assert again is first
        assert find(table.sweep(full=True)[0], t.tid) is not first
        os.setpriority(os.PRIO_PROCESS, t.tid, -2)
        assert find(table.sweep(full=False)[0], t.tid).nice == -2


def test_kernel_threads_that_matter_are_shown_and_kept_cheaply(table):
    threads = table.sweep()[0]
    kthreads = [t for t in threads if t.is_kthread and t.policy == SchedClass.OTHER and t.nice]
    if not kthreads:
        pytest.skip("no niced kernel threads here")
    again = table.sweep(full=False)[0]
    for k in kthreads:
        assert find(again, k.tid) is k  # verified, not re-read
    # every shown thread agrees with what a fresh one-shot table reads
    fresh = ThreadTable(LiveKernel(), watch=False)
    try:
        ref = {t.tid: (t.policy, t.rt_priority, t.nice) for t in fresh.sweep()[0]}
    finally:
        fresh.close()
    for k in kthreads:
        assert ref[k.tid] == (k.policy, k.rt_priority, k.nice)


def test_stat_fds_follow_the_threads_that_matter(table):
    assert len(table._stat) <= len(table.sweep()[0])
    with sched_thread(os.SCHED_FIFO, 5) as t:
        table.sweep(full=False)
        assert t.tid in table._stat
        os.sched_setscheduler(t.tid, os.SCHED_OTHER, os.sched_param(0))
        table.sweep(full=False)
        assert t.tid not in table._stat
        os.sched_setscheduler(t.tid, os.SCHED_RR, os.sched_param(5))
        table.sweep(full=False)
        assert t.tid in table._stat
    table.sweep(full=False)  # the thread exited: its fd is closed at the next sweep
    assert t.tid not in table._stat
    assert len(table._stat) <= len(table.sweep()[0])


def test_stat_reader_beyond_its_cap_falls_back_to_open_read():
    kernel = LiveKernel()
    reader = StatReader(kernel, cap=1)
    me, pid = threading.get_native_id(), os.getpid()
    with sched_thread(os.SCHED_OTHER) as t:
        try:
            assert reader.read(pid, me).startswith(f"{me} (".encode())
            assert len(reader) == 1
            assert b"(" in reader.read(pid, t.tid) and len(reader) == 1
        finally:
            reader.close()
    assert len(reader) == 0
    gone = SchedThread(os.SCHED_OTHER).start()
    reader = StatReader(kernel)
    reader.read(pid, gone.tid)
    gone.stop()
    time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        reader.read(pid, gone.tid)
    assert len(reader) == 0
    reader.close()


def _wait_young(obs: Observer, until: float) -> bool:
    """Drive the observer as the daemon does until check_changes says 'snapshot now'."""
    while time.monotonic() < until:
        due = obs.deadline()
        timeout = 0.05 if due is None else max(0.0, min(0.05, due - time.monotonic()))
        for fd in select.select(obs.fds(), [], [], timeout)[0]:
            obs.handle_readable(fd)
        due = obs.deadline()
        if due is not None and time.monotonic() >= due and obs.check_changes(time.monotonic()):
            return True
    return False


@contextmanager
def starting_thread(policy: int) -> Iterator[list[int]]:
    """A thread that sets ``policy`` a moment after it starts, like a new RT thread;
    yields a list that holds its tid once it runs."""
    stop = threading.Event()
    tid: list[int] = []

    def body() -> None:
        tid.append(threading.get_native_id())
        time.sleep(0.004)
        os.sched_setscheduler(0, policy, os.sched_param(7 if policy else 0))
        stop.wait(30)

    th = threading.Thread(target=body, daemon=True)
    th.start()
    try:
        yield tid
    finally:
        stop.set()
        th.join(5)


@pytest.fixture
def watching():
    with Observer() as obs:
        if obs.thread_mode != "events":
            pytest.skip("process-events connector unavailable here")
        obs.snapshot(time.monotonic())
        yield obs


def test_young_thread_going_fifo_asks_for_a_snapshot(watching):
    started = time.monotonic()
    with starting_thread(os.SCHED_FIFO) as tid:
        info = None
        while info is None and _wait_young(watching, started + 2.0):
            info = find(watching.snapshot(time.monotonic(), full=False).threads, tid[0])
        assert info is not None and info.policy == SchedClass.FIFO
        assert time.monotonic() - started < 0.5  # far sooner than any sweep interval


def test_young_thread_staying_other_leaves_the_young_set(watching):
    with starting_thread(os.SCHED_OTHER) as tid:
        until = time.monotonic() + 0.4
        while _wait_young(watching, until):  # other processes' new RT threads, if any
            watching.snapshot(time.monotonic(), full=False)
        assert tid[0] not in watching._threads.young
        assert find(watching.snapshot(time.monotonic(), full=False).threads, tid[0]) is None


def test_young_hit_is_held_back_to_the_cpu_share(watching):
    # pretend a snapshot costs 50 ms and the bucket is empty: the next young one in 1 s
    watching._cost, watching._change_credit, watching._credit_at = 0.05, 0.0, time.monotonic()
    with starting_thread(os.SCHED_FIFO):
        assert not _wait_young(watching, time.monotonic() + 0.3)
        due = watching.deadline()
        assert due is not None and due > time.monotonic()
        assert _wait_young(watching, time.monotonic() + 2.0)


def test_young_set_is_bounded_and_checks_coalesce():
    young = YoungThreads(ages=(0.002, 0.010), cap=3, coalesce=0.005)
    for tid, born in ((1, 0.0), (2, 0.001), (3, 0.002), (4, 0.003)):
        young.add(tid, born)
    assert len(young) == 3 and young.dropped == 1 and 1 not in young and 4 in young
    assert young.deadline() == pytest.approx(0.003)  # tid 2's (tid 1 dropped: oldest)
    due = young.take_due(0.0045)
    assert [tid for _, _, tid in due] == [2, 3]
    for stage, born, tid in due:
        young.again(stage, born, tid)
    assert young.deadline() == pytest.approx(0.0045 + 0.005)  # tid 4 due at .005: coalesced
    due = young.take_due(0.0095)
    assert [tid for _, _, tid in due] == [4]
    young.again(*due[0])
    assert [tid for _, _, tid in young.take_due(1.0)] == [2, 3, 4]
    assert len(young) == 0 and young.deadline() is None


def _thread(tid: int, comm: str, policy=SchedClass.FIFO, flags: int = 0x00200000) -> ThreadInfo:
    return ThreadInfo(tid, 2, comm, policy, 50, 0, 0, 0, 0, frozenset({0}), 0, "S", "", "",
                      flags)


def test_irq_threads_follow_the_fresh_sweep():
    irqs = (IrqInfo(24, "chip", "", ("acpi",), (1,), frozenset({0}), frozenset({0}), 0.0,
                    (_thread(50, "irq/24-ACPI"),)),
            IrqInfo(25, "chip", "", ("eth0",), (1,), frozenset({0}), frozenset({0}), 0.0))
    same = (irqs[0].threads[0],)
    assert with_irq_threads(irqs, same) is irqs
    moved = _thread(50, "irq/24-ACPI", SchedClass.RR)
    out = with_irq_threads(irqs, [moved, _thread(60, "irq/25-eth0")])
    assert out[0].threads == (moved,) and out[1].threads[0].tid == 60
    assert with_irq_threads(irqs, [])[0].threads == ()


def test_cheap_snapshot_reuses_irq_and_cpu_tables():
    with Observer(watch=False) as obs:
        first = obs.snapshot(time.monotonic())
        with sched_thread(os.SCHED_FIFO, 9) as t:
            cheap = obs.snapshot(time.monotonic(), full=False)
            assert cheap.cpus is first.cpus
            assert [i.irq for i in cheap.irqs] == [i.irq for i in first.irqs]
            assert find(cheap.threads, t.tid).rt_priority == 9
            for irq in cheap.irqs:
                assert all(find(cheap.threads, th.tid) is th for th in irq.threads)
        assert obs.snapshot(time.monotonic()).cpus is not first.cpus
