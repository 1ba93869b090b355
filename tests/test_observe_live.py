"""The observer against this machine: real threads with real scheduling policies."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
from helpers.threads import SchedThread, sched_thread

from guestagent.observe import Observer, pinned_critical
from guestagent.observe.kernel import LiveKernel
from guestagent.protocol.model import SchedClass

# -- tests ----------------------------------------------------------------------------

pytestmark = pytest.mark.root


def find(snap, tid):
    return next((t for t in snap.threads if t.tid == tid), None)


@pytest.fixture
def observer():
    with Observer() as obs:
        yield obs


def drain(obs):
    from guestagent.observe.kernel import wait_readable

    for fd in wait_readable(obs.fds(), 0):
        obs.handle_readable(fd)


def test_policies_of_real_threads_are_seen(observer):
    with sched_thread(os.SCHED_FIFO, 10) as fifo, sched_thread(os.SCHED_RR, 20) as rr, \
            sched_thread(os.SCHED_BATCH, 0, nice=5) as batch, \
            sched_thread(os.SCHED_IDLE) as idle:
        drain(observer)
        snap = observer.snapshot(time.monotonic())
        got = {t.tid: t for t in snap.threads}
        assert got[fifo.tid].policy == SchedClass.FIFO and got[fifo.tid].rt_priority == 10
        assert got[rr.tid].policy == SchedClass.RR and got[rr.tid].rt_priority == 20
        assert got[batch.tid].policy == SchedClass.BATCH and got[batch.tid].nice == 5
        assert got[idle.tid].policy == SchedClass.IDLE
        me = got[fifo.tid]
        assert me.tgid == os.getpid()
        assert me.affinity == frozenset(os.sched_getaffinity(0))
        assert me.state in ("S", "R")
        assert me.exe == os.path.realpath(sys.executable)
        assert me.last_cpu in me.affinity
        assert snap.nr_threads >= len(snap.threads) >= 4


def test_fifo_thread_pinned_to_cpu1_with_hostile_name(observer):
    if 1 not in os.sched_getaffinity(0):
        pytest.skip("CPU 1 is not available to this process")
    with sched_thread(os.SCHED_FIFO, 42, comm=b"a) b(c", cpus={1}) as t:
        drain(observer)
        snap = observer.snapshot(time.monotonic())
        info = find(snap, t.tid)
        assert info is not None
        assert (info.comm, info.policy, info.rt_priority) == ("a) b(c", SchedClass.FIFO, 42)
        assert info.affinity == frozenset({1})
        assert any(f"thread {t.tid}" in r for r in pinned_critical(snap).get(1, ()))
        assert not any(f"thread {t.tid}" in r for r in pinned_critical(snap).get(0, ()))


@pytest.mark.parametrize("raw, shown", [
    (b"x\ny", "x\ny"),
    (b"\xff\xfe z)", "\\xff\\xfe z)"),
    (b"((()))", "((()))"),
])
def test_comm_with_newline_or_invalid_utf8(observer, raw, shown):
    with sched_thread(os.SCHED_RR, 3, comm=raw) as t:
        drain(observer)
        info = find(observer.snapshot(time.monotonic()), t.tid)
        assert info is not None and info.comm == shown


def test_niced_process_is_seen(observer):
    proc = subprocess.Popen(["nice", "-n", "7", "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        info = None
        while info is None and time.monotonic() < deadline:
            drain(observer)
            snap = observer.snapshot(time.monotonic())
            info = find(snap, proc.pid)
            if info is None or info.comm != "sleep":
                info = None
                time.sleep(0.01)
        assert info is not None, "nice'd sleep never appeared"
        assert (info.policy, info.nice, info.tgid) == (SchedClass.OTHER, 7, proc.pid)
        assert info.exe.endswith("sleep")
    finally:
        proc.kill()
        proc.wait()


def test_deadline_thread_parameters():
    with Observer() as obs:
        t = SchedThread(0, deadline=(2_000_000, 10_000_000, 20_000_000))
        try:
            t.start()
        except OSError as err:
            if err.errno in (errno.EPERM, errno.EBUSY, errno.EINVAL, errno.ENOSYS):
                pytest.skip(f"this kernel refused SCHED_DEADLINE here: {err}")
            raise
        try:
            info = find(obs.snapshot(time.monotonic()), t.tid)
            assert info is not None and info.policy == SchedClass.DEADLINE
            assert (info.dl_runtime, info.dl_deadline, info.dl_period) == \
                (2_000_000, 10_000_000, 20_000_000)
        finally:
            t.stop()


def test_connector_tracks_new_and_exited_threads(observer):
    if observer.thread_mode != "events":
        pytest.skip("process-events connector unavailable here (needs CAP_NET_ADMIN)")
    observer.snapshot(time.monotonic())
    before = observer.snapshot(time.monotonic()).nr_threads
    with sched_thread(os.SCHED_FIFO, 5) as t:
        drain(observer)
        snap = observer.snapshot(time.monotonic())
        assert find(snap, t.tid) is not None
        assert snap.nr_threads >= before + 1
    time.sleep(0.05)
    drain(observer)
    assert find(observer.snapshot(time.monotonic()), t.tid) is None


def test_rescan_fallback_finds_threads_without_events():
    with Observer(watch=False) as obs:
        assert obs.thread_mode == "rescan" and obs.fds() == []
        obs.snapshot(time.monotonic())
        with sched_thread(os.SCHED_RR, 7) as t:
            assert find(obs.snapshot(time.monotonic()), t.tid) is not None
        assert find(obs.snapshot(time.monotonic()), t.tid) is None


def test_unavailable_connector_is_said_once():
    class NoEvents(LiveKernel):
        def proc_events(self):
            raise PermissionError(errno.EPERM, "Operation not permitted")

    with Observer(NoEvents()) as obs:
        first = obs.snapshot(time.monotonic()).notes
        assert any("process events unavailable (Operation not permitted)" in n for n in first)
        assert obs.thread_mode == "rescan"
        assert not any("process events" in n for n in obs.snapshot(time.monotonic()).notes)


def test_interest_selects_plain_threads_by_comm():
    def wanted(ident):
        return ident.comm == "audio-loop" and ident.tgid == os.getpid()

    with Observer(interest=wanted) as obs:
        with sched_thread(os.SCHED_OTHER, comm=b"audio-loop") as t, \
                sched_thread(os.SCHED_OTHER, comm=b"boring") as other:
            drain(obs)
            snap = obs.snapshot(time.monotonic())
            info = find(snap, t.tid)
            assert info is not None and info.policy == SchedClass.OTHER
            assert find(snap, other.tid) is None
            obs.set_interest(lambda ident: ident.comm == "boring")
            snap = obs.snapshot(time.monotonic())
            assert find(snap, other.tid) is not None and find(snap, t.tid) is None


def test_interest_that_raises_is_a_note_not_a_crash():
    def broken(ident):
        raise KeyError("unit")

    with Observer(interest=broken) as obs:
        snap = obs.snapshot(time.monotonic())
        assert any("interest rule failed (KeyError" in n for n in snap.notes)


def test_real_irq_table_and_threaded_irqs(observer):
    snap = observer.snapshot(time.monotonic())
    with open("/proc/interrupts") as f:
        numbered = [ln.split(":")[0].strip() for ln in f.read().splitlines()[1:]]
    assert [i.irq for i in snap.irqs] == [int(n) for n in numbered if n.isdigit()]
    ncpu = os.cpu_count()
    for irq in snap.irqs:
        assert len(irq.counts) >= ncpu and irq.rate == 0.0
    threaded = [i for i in snap.irqs if i.threads]
    irq_threads = [t for t in snap.threads if t.comm.startswith("irq/") and t.is_kthread]
    if not irq_threads:
        pytest.skip("this kernel has no threaded IRQs (irq/N-name kthreads)")
    for t in irq_threads:
        n = int(t.comm[4:].split("-")[0])
        owner = next(i for i in threaded if i.irq == n)
        assert t in owner.threads and t.policy == SchedClass.FIFO


def test_irq_rates_and_steal_need_two_sweeps(observer):
    observer.snapshot(time.monotonic())
    time.sleep(0.2)
    snap = observer.snapshot(time.monotonic())
    assert all(i.rate >= 0.0 for i in snap.irqs)
    assert set(snap.cpus.steal) == set(snap.cpus.online)
    assert all(0.0 <= v <= 1.0 for v in snap.cpus.steal.values())


def test_real_cpu_state(observer):
    cpus = observer.snapshot(time.monotonic()).cpus
    assert cpus.online == frozenset(range(os.cpu_count())) or cpus.online
    assert cpus.online <= cpus.possible
    assert cpus.isolated <= cpus.possible


def test_netdev_of_real_nic():
    from guestagent.observe.irqs import netdev_irqs

    kernel = LiveKernel()
    links = [n for n in kernel.net_links() if os.path.exists(f"/sys/class/net/{n}/device")]
    if not links:
        pytest.skip("no network interface backed by a device here")
    snap = Observer(watch=False).snapshot(time.monotonic())
    mapped = {n for i in snap.irqs for n in i.netdevs}
    actions = {i.irq: i.actions for i in snap.irqs}
    assert mapped == {n for names in netdev_irqs(kernel, links, actions).values() for n in names}
    assert mapped, f"none of {links} mapped to an IRQ"
