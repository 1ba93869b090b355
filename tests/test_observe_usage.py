"""Per-CPU busy and low-priority shares, from real spinning threads."""

from __future__ import annotations

import os
import threading
import time

import pytest

from guestagent.observe import Observer

pytestmark = pytest.mark.skipif(os.cpu_count() < 2, reason="needs 2 CPUs to pin apart")


def spin(cpu: int, policy: int, nice: int, stop: threading.Event, ready: threading.Event):
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, policy, os.sched_param(0))
    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    ready.set()
    while not stop.is_set():
        pass


def own_ticks(tid: int) -> int:
    """utime + stime of one of our threads, read directly (not through the observer)."""
    with open(f"/proc/self/task/{tid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.parametrize("policy, nice", [(os.SCHED_BATCH, 0), (os.SCHED_IDLE, 0),
                                          (os.SCHED_OTHER, 10)])
def test_lowprio_share_counts_batch_idle_and_niced_work(policy, nice):
    stop, ready = threading.Event(), threading.Event()
    worker = threading.Thread(target=spin, args=(1, policy, nice, stop, ready), daemon=True)
    worker.start()
    hz = os.sysconf("SC_CLK_TCK")
    try:
        assert ready.wait(5)
        with Observer(watch=False) as observer:
            start, before = time.monotonic(), own_ticks(worker.native_id)
            observer.snapshot(start)
            time.sleep(1.0)
            end = time.monotonic()
            snap = observer.snapshot(end)
            spun = (own_ticks(worker.native_id) - before) / hz / (end - start)
    finally:
        stop.set()
        worker.join()
    busy, low = snap.cpus.busy[1], snap.cpus.lowprio[1]
    # Two estimates of what the spinner took of CPU 1, each wrong in its own way:
    # other load on CPU 1 counts in `busy`; in a VM whose vCPU the host preempts,
    # a thread's own run time includes the stolen time (seen here: 1.4 CPUs).
    # The low-priority share must cover most of the smaller one.
    assert spun > 0, "the spinner never ran"
    floor = min(spun, busy)
    assert low >= 0.75 * floor - 2 / hz, \
        f"low {low:.3f} < 3/4 of min(spinner {spun:.3f}, busy {busy:.3f})"
    assert low <= busy + 1e-9


def test_first_snapshot_has_no_usage_figures():
    with Observer(watch=False) as observer:
        snap = observer.snapshot(time.monotonic())
    assert snap.cpus.busy == {} and snap.cpus.lowprio == {}


def test_the_observers_own_run_time_is_not_the_vcpus_workload():
    """A vCPU running a nice-19 loop stays low-priority although the agent ran there too:
    counting the agent's own sweeps kept a lowered vCPU at nice 0 (the slower the vCPU,
    the larger the agent's share of it)."""
    from dataclasses import replace

    from helpers.snapshots import cpus, snap, thread

    from guestagent.agent.config import default_config
    from guestagent.agent.policy import wanted_hints
    from guestagent.observe.cpus import with_lowprio_threads
    from guestagent.protocol.model import Request

    agent = replace(thread(500, last=0), tgid=400, cpu_ticks=130)  # 30 ticks in 1 s
    before = {500: 100}
    measured = cpus(busy={0: 1.0, 1: 0.0}, lowprio={0: 0.7, 1: 0.0})  # /proc/stat's view
    mine = with_lowprio_threads(measured, [agent], before, 1.0, 100, own_tgid=400)
    assert mine.busy[0] == pytest.approx(0.7) and mine.lowprio[0] == pytest.approx(0.7)
    assert wanted_hints(snap(cpu_state=mine), default_config())[0].hint.request is Request.UNBOOST
    # Someone else's nice-0 thread is the vCPU's work: no unboost.
    other = with_lowprio_threads(measured, [agent], before, 1.0, 100, own_tgid=1)
    assert other.busy[0] == pytest.approx(1.0)
    assert wanted_hints(snap(cpu_state=other), default_config())[0].hint.request is not Request.UNBOOST
