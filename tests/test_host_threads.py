"""Discovery, applier and capacity against real threads of a stand-in QEMU process.

Scheduler state is read back from the kernel with os.sched_get*/getpriority.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from helpers.standin import MainLoopThread, Standin

from guestagent.errors import GuestagentError
from guestagent.host.applier import ThreadApplier, read_settings, resetting_on_fork
from guestagent.host.arbiter import EMULATOR
from guestagent.host.capacity import (
    Sample,
    ThreadTimes,
    capacities,
    parse_task_stat,
    read_sample,
    vcpu_capacity,
)
from guestagent.host.discovery import (
    VcpuThread,
    discover,
    parse_cpus_fast,
    thread_start_time,
    vcpus_from_names,
)
from guestagent.host.settings import ThreadSettings
from guestagent.linux.procfs import CpuTimes, ParseError, parse_proc_stat_times
from guestagent.protocol.model import AppliedFlag
from guestagent.sched import SCHED_RESET_ON_FORK

pytestmark = pytest.mark.root


def test_discover_via_qmp_uses_thread_ids_and_peer_pid(standin):
    pid, threads = discover(standin.qmp)
    assert pid == standin.pid
    assert {t.vcpu: t.tid for t in threads} == standin.tids


def test_discover_falls_back_to_thread_names(tmp_path):
    s = Standin(str(tmp_path / "q"), 2, accel="TCG", no_query=True)
    try:
        pid, threads = discover(s.qmp)
        assert {t.vcpu: t.tid for t in threads} == s.tids
        assert discover(None, pid=s.pid)[1] == threads
    finally:
        s.stop()


def test_discover_refuses_threads_of_other_processes(tmp_path):
    # A QMP server that names this test process's own thread: it is not the server's.
    path = str(tmp_path / "liar")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {}}\n')
            f.flush()
            for line in f:
                cmd = json.loads(line)["execute"]
                ret = {} if cmd == "qmp_capabilities" else [
                    {"cpu-index": 0, "thread-id": 1}]  # pid 1's main thread
                f.write(json.dumps({"return": ret}).encode() + b"\n")
                f.flush()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(GuestagentError, match="has none of the vCPU threads"):
        discover(path)
    server.close()


def test_discover_errors_are_one_line(tmp_path):
    with pytest.raises(GuestagentError, match="cannot talk QMP"):
        discover(str(tmp_path / "nothing"))
    with pytest.raises(GuestagentError, match="need --qmp"):
        discover(None)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(GuestagentError, match="no threads named"):
            discover(None, pid=proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_parsers_skip_malformed_entries():
    assert parse_cpus_fast([{"cpu-index": 0, "thread-id": 5}, {"cpu-index": "x"}, 7,
                            {"cpu-index": 1, "thread-id": -3}]) == {0: 5}
    assert parse_cpus_fast({"oops": 1}) == {}
    names = {10: "CPU 0/KVM\n", 11: "CPU 1/TCG", 12: "CPU 2/KVMx", 13: "worker", 14: "CPU 0/KVM"}
    assert vcpus_from_names(names) == {0: 10, 1: 11}


def test_apply_boost_and_restore_read_back_from_kernel(standin):
    pid, threads = discover(standin.qmp)
    logs = []
    applier = ThreadApplier(pid, threads, dry_run=False, log=logs.append)
    tid0, tid1 = standin.tids[0], standin.tids[1]
    before = {t: read_settings(t) for t in (tid0, tid1)}
    boosted = ThreadSettings(os.SCHED_FIFO, 30, 0, frozenset({1}))
    got = applier.apply(0, boosted)
    # The boost is made with SCHED_RESET_ON_FORK: threads it creates start unboosted.
    assert got == replace(boosted, policy=os.SCHED_FIFO | SCHED_RESET_ON_FORK)
    assert os.sched_getscheduler(tid0) == os.SCHED_FIFO | SCHED_RESET_ON_FORK
    assert applier.apply(0, boosted) == got  # already so: no change, no syscall
    assert os.sched_getparam(tid0).sched_priority == 30
    assert os.sched_getaffinity(tid0) == {1}
    niced = ThreadSettings(os.SCHED_OTHER, 0, 10, before[tid1].affinity)
    assert applier.apply(1, niced) == niced
    assert os.getpriority(os.PRIO_PROCESS, tid1) == 10
    # Only the vCPU threads were touched.
    assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    applier.restore_all()
    assert {t: read_settings(t) for t in (tid0, tid1)} == before
    assert not logs


@pytest.mark.parametrize("original_nice", [0, -5])
def test_threads_created_by_a_boosted_thread_start_unboosted(original_nice):
    # QEMU's main loop, boosted with the emulator thread, creates worker threads (the
    # thread pool, 9p, block IO): they must not inherit FIFO, which nothing would take
    # back and which keeps the RT cgroup busy when its runtime is given back.
    s = MainLoopThread()
    if original_nice:
        os.setpriority(os.PRIO_PROCESS, s.tid, original_nice)
    thread = VcpuThread(EMULATOR, s.tid, thread_start_time(os.getpid(), s.tid))
    applier = ThreadApplier(os.getpid(), [thread], dry_run=False, log=print)
    before = read_settings(s.tid)
    got = applier.apply(EMULATOR, replace(before, policy=os.SCHED_FIFO, rt_priority=1))
    try:
        assert got is not None and got.policy & 0xFF == os.SCHED_FIFO
        assert s.spawn() == (os.SCHED_OTHER, 0, 0)
        applier.restore_all()
        assert read_settings(s.tid) == before
    finally:
        applier.restore_all()
        s.close()


def test_an_operators_rt_thread_keeps_its_own_fork_behaviour():
    # Raising a thread the operator made FIFO (without the flag) keeps it so.
    original = ThreadSettings(os.SCHED_FIFO, 1, 0, frozenset({0}))
    raised = resetting_on_fork(original, replace(original, rt_priority=10))
    assert raised.policy == os.SCHED_FIFO
    assert resetting_on_fork(ThreadSettings(os.SCHED_OTHER, 0, 0, frozenset({0})),
                             raised).policy == os.SCHED_FIFO | SCHED_RESET_ON_FORK
    flagged = replace(original, policy=os.SCHED_FIFO | SCHED_RESET_ON_FORK)
    assert resetting_on_fork(flagged, replace(original, rt_priority=1)) == flagged


def test_dry_run_changes_nothing(standin):
    pid, threads = discover(standin.qmp)
    logs = []
    applier = ThreadApplier(pid, threads, dry_run=True, log=logs.append)
    tid0 = standin.tids[0]
    before = read_settings(tid0)
    applier.apply(0, ThreadSettings(os.SCHED_FIFO, 30, 0, frozenset({0})))
    assert read_settings(tid0) == before
    assert logs and "would set fifo 30" in logs[0]
    applier.restore_all()
    assert read_settings(tid0) == before


def test_vanished_threads_are_handled_quietly(tmp_path):
    s = Standin(str(tmp_path / "q"), 2)
    pid, threads = discover(s.qmp)
    logs = []
    applier = ThreadApplier(pid, threads, dry_run=False, log=logs.append)
    applier.apply(0, ThreadSettings(os.SCHED_RR, 5, 0, frozenset({0, 1})))
    s.stop()
    assert applier.apply(1, ThreadSettings(os.SCHED_RR, 5, 0, frozenset({0, 1}))) is None
    applier.restore_all()  # no exception
    assert applier.tids() == {}
    assert all("gone" in line for line in logs)


def test_capacity_arithmetic():
    before = Sample({0: CpuTimes(0, 0, 0), 1: CpuTimes(0, 0, 0)}, {0: ThreadTimes(0, 1)})
    after = Sample({0: CpuTimes(10, 0, 0, 90), 1: CpuTimes(70, 0, 10, 20)},
                   {0: ThreadTimes(30, 1)})
    # pCPU 1 was 70% busy and 10% stolen, 30 points of it the vCPU itself: others 50%.
    assert vcpu_capacity(before, after, 0) == (512, 512, 1)
    assert vcpu_capacity(before, after, 5) == (1024, -1, -1)
    assert vcpu_capacity(after, after, 0) == (1024, -1, 1)  # no time passed
    caps = capacities(before, after, {0: AppliedFlag.BOOSTED}, {0: 100}, 7)
    assert caps[0].capacity == 100 and caps[0].applied == AppliedFlag.BOOSTED
    assert caps[0].acked_generation == 7


def test_proc_parsers_tolerate_garbage():
    # The host reads /proc/stat with the shared procfs parser: busy, steal and idle add up to total.
    stat = "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 10 0 10 60 10 0 0 10 0 0\ncpu1 5 5 0 0 0 0 0\n"
    cpus = parse_proc_stat_times(stat + "intr 1\n")
    assert cpus == {0: CpuTimes(20, 0, 10, 70), 1: CpuTimes(10, 5, 0, 0)}
    assert cpus[0].total == 100 and cpus[1].total == 10
    with pytest.raises(ParseError):
        parse_proc_stat_times(stat + "cpuX 1\n")
    line = b"42 (CPU 0/KVM) (x) R " + " ".join(str(i) for i in range(4, 53)).encode()
    assert parse_task_stat(line) == ThreadTimes(run=14 + 15, pcpu=39)
    assert parse_task_stat(b"garbage") is None


def test_capacity_sees_a_hog_on_the_vcpus_pcpu(tmp_path):
    # Whoever holds CPU 1 at SCHED_FIFO gets nearly all of it, so other load on this
    # shared machine cannot blur the contrast: first the vCPU thread, then a hog.
    s = Standin(str(tmp_path / "q"), 1, mode="spin")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        pid, threads = discover(s.qmp)
        tid = s.tids[0]
        os.sched_setaffinity(tid, {1})
        os.sched_setaffinity(hog.pid, {1})
        os.sched_setscheduler(hog.pid, os.SCHED_IDLE, os.sched_param(0))

        def measure():
            a = read_sample(pid, s.tids)
            time.sleep(0.5)
            return vcpu_capacity(a, read_sample(pid, s.tids), 0)

        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
        alone = measure()  # its own run time is not load on its pCPU
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        os.sched_setscheduler(hog.pid, os.SCHED_FIFO, os.sched_param(1))
        shared = measure()  # the hog's is
        assert alone[2] == shared[2] == 1
        assert alone[0] > 800 and shared[0] < 300, (alone, shared)
        assert shared[1] == 1024 - shared[0]
    finally:
        hog.kill()
        hog.wait()
        s.stop()
