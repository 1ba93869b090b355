"""A peer killed with SIGKILL leaves the host able to undo every boost.

The peer runs as a subprocess over the real region link against a stand-in
QEMU's threads; every thread's state is read back from the kernel.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from helpers.hostregion import PERIOD, start_peer, status_of, zeroed_region
from helpers.standin import policy, pump, ticking
from helpers.waiting import wait_for

from guestagent.host.applier import ThreadApplier, read_settings
from guestagent.host.discovery import discover, thread_start_time
from guestagent.host.settings import ThreadSettings
from guestagent.host.statefile import UndoJournal, process_id, state_path, write_atomically
from guestagent.host.undo import (
    GONE,
    LOWEST_INDEX,
    RECYCLED,
    RESTORE,
    ProcessId,
    StateError,
    ThreadRecord,
    UndoRecord,
    decode,
    encode,
    iothread_index,
    judge_thread,
)
from guestagent.protocol.model import PeerState, Request, SchedClass, VcpuHint
from guestagent.transport import RegionGuestLink

pytestmark = pytest.mark.root

FIFO40 = (os.SCHED_FIFO, 40)


def kernel(tid):
    return read_settings(tid)


def odd_originals(standin):
    """Originals no peer would choose, so restoring them cannot pass by accident."""
    t0, t1 = standin.tids[0], standin.tids[1]
    os.setpriority(os.PRIO_PROCESS, t0, 3)
    os.sched_setaffinity(t0, {0})
    os.sched_setscheduler(t1, os.SCHED_BATCH, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, t1, -2)
    return {t: kernel(t) for t in (t0, t1)}


def host(*args):
    return subprocess.run([sys.executable, "-m", "guestagent.host.cli", *args],
                          capture_output=True, text=True, timeout=30)


def boost_then_sigkill(standin, tmp_path):
    """Start a peer; the guest boosts vCPU 0, unboosts vCPU 1 and keeps the two on distinct
    CPUs (so vCPU 1 is pinned); SIGKILL the peer."""
    region = str(tmp_path / "guestagent-vm1")
    zeroed_region(region)
    peer, _ = start_peer(standin, tmp_path, region)
    t0, t1 = standin.tids[0], standin.tids[1]
    guest = RegionGuestLink(region, 2, heartbeat_period=PERIOD / 2)
    try:
        guest.set_state(PeerState.RUNNING, time.monotonic())
        guest.publish((VcpuHint(0, Request.BOOST, SchedClass.FIFO, rt_priority=99, group=1),
                       VcpuHint(1, Request.UNBOOST, nice=12, group=1)), 1, time.monotonic())
        assert pump(guest, 8.0, lambda: policy(t0) == FIFO40 and kernel(t1).nice == 12
                    and kernel(t1).affinity == {1})
        with ticking(guest):  # the lease holds until the very moment of the kill
            peer.send_signal(signal.SIGKILL)
            assert peer.wait(10) == -signal.SIGKILL
    finally:
        guest.close()
        peer.kill()
        peer.wait()
    return str(tmp_path / "state")


def test_sigkilled_peer_leaves_boost_and_restore_puts_originals_back(standin, tmp_path):
    before = odd_originals(standin)
    t0, t1 = standin.tids[0], standin.tids[1]
    state = boost_then_sigkill(standin, tmp_path)
    time.sleep(3 * PERIOD)  # well past the lease: nobody is left to revert
    assert policy(t0) == FIFO40 and kernel(t1).nice == 12  # still boosted, still pinned
    assert os.sched_getaffinity(t1) == {1} != before[t1].affinity
    path = state_path(state, process_id(standin.pid))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    record = decode(open(path, "rb").read())
    assert {t.thread.pid: t.original for t in record.threads} == before

    dry = host("restore", "--state-dir", state, "--dry-run")
    assert dry.returncode == 0 and "would restore" in dry.stdout and os.path.exists(path)
    assert policy(t0) == FIFO40
    proc = host("restore", "--state-dir", state)
    assert proc.returncode == 0, proc.stderr
    assert {t: kernel(t) for t in (t0, t1)} == before
    assert (os.sched_getscheduler(t1), os.getpriority(os.PRIO_PROCESS, t1)) == (
        os.SCHED_BATCH, -2)
    assert os.sched_getaffinity(t0) == {0} and os.sched_getparam(t0).sched_priority == 0
    assert not os.path.exists(path) and proc.stdout.count("restored") == 2
    assert host("restore", "--state-dir", state).stdout.startswith("no state files")


def test_new_peer_restores_before_anything_else(standin, tmp_path):
    before = odd_originals(standin)
    t0, t1 = standin.tids[0], standin.tids[1]
    state = boost_then_sigkill(standin, tmp_path)
    path = state_path(state, process_id(standin.pid))
    assert os.path.exists(path) and policy(t0) == FIFO40
    peer, status = start_peer(standin, tmp_path, str(tmp_path / "guestagent-vm1"))
    try:
        assert wait_for(lambda: not os.path.exists(path), 8.0)
        assert {t: kernel(t) for t in (t0, t1)} == before
        status_of(status)  # serving: its signal handling is in place before the SIGTERM
        peer.send_signal(signal.SIGTERM)
        assert peer.wait(10) == 0
        err = peer.stderr.read()
        assert "restored fifo" not in err and err.count("restored ") == 2, err
        # The new peer read the real originals, not the dead peer's boost.
        assert {t: kernel(t) for t in (t0, t1)} == before
    finally:
        peer.kill()
        peer.wait()


def boosted(tid):
    os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(20))
    return kernel(tid)


DEAD_PEER = ProcessId(1 << 22, 0)  # above any pid_max: a peer that is surely gone


def plant(tmp_path, qemu, threads, peer=DEAD_PEER, data=None):
    """A state file as a dead peer would leave it (or `data`, as written)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    path = state_path(str(state), qemu)
    write_atomically(path, data if data is not None else encode(
        UndoRecord(peer, qemu, tuple(threads))))
    return str(state), path


OTHER = ThreadSettings(os.SCHED_OTHER, 0, 0, frozenset({0, 1}))


def record_of(vcpu, pid, tid, original=OTHER):
    """The record of thread `tid` of process `pid`, with its real start time."""
    return ThreadRecord(vcpu, ProcessId(tid, thread_start_time(pid, tid)), original)


def test_recycled_tid_is_not_touched(standin, tmp_path):
    t0, t1 = standin.tids[0], standin.tids[1]
    qemu = process_id(standin.pid)
    was0, _ = boosted(t0), boosted(t1)
    recycled = ThreadRecord(0, ProcessId(t0, thread_start_time(standin.pid, t0) + 1), OTHER)
    state, path = plant(tmp_path, qemu, [recycled, record_of(1, standin.pid, t1)])
    proc = host("restore", "--state-dir", state)
    assert proc.returncode == 0, proc.stderr
    assert kernel(t0) == was0 and policy(t1) == (os.SCHED_OTHER, 0)
    assert "recycled" in proc.stdout and not os.path.exists(path)


def helper_thread():
    """A thread of this test process, as a hostile file would name it."""
    stop, ready, tid = threading.Event(), threading.Event(), []

    def run():
        tid.append(threading.get_native_id())
        ready.set()
        stop.wait()

    threading.Thread(target=run, daemon=True).start()
    ready.wait()
    return tid[0], stop


def test_hostile_state_files_are_refused_and_left_in_place(standin, tmp_path):
    t0 = standin.tids[0]
    qemu = process_id(standin.pid)
    was0 = boosted(t0)
    mine, stop = helper_thread()
    try:
        mine_before = kernel(mine)
        fifo = ThreadSettings(os.SCHED_FIFO, 30, 0, frozenset({0}))
        good = record_of(0, standin.pid, t0)
        ours = record_of(1, os.getpid(), mine, fifo)
        text = encode(UndoRecord(DEAD_PEER, qemu, (good,))).decode()
        cases = {
            "another process": encode(UndoRecord(DEAD_PEER, qemu, (good, ours))),
            "wrong type": text.replace(f'"tid": {t0}', f'"tid": "{t0}"').encode(),
            "version": text.replace('"version": 1', '"version": 2').encode(),
            "bool": text.replace('"nice": 0', '"nice": false').encode(),
            "not json": b"{",
        }
        for why, data in cases.items():
            state, path = plant(tmp_path, qemu, (), data=data)
            proc = host("restore", "--state-dir", state)
            assert proc.returncode == 1, why
            assert proc.stderr.count("\n") == 1 and "refused" in proc.stderr, (why, proc.stderr)
            assert os.path.exists(path), why
            assert kernel(t0) == was0 and kernel(mine) == mine_before, why
        # A well-formed file that others could have read or replaced is refused too.
        os.unlink(path)
        state, path = plant(tmp_path, qemu, [good])
        os.chmod(path, 0o644)
        proc = host("restore", "--state-dir", state)
        assert proc.returncode == 1 and "mode 0600" in proc.stderr and os.path.exists(path)
        assert kernel(t0) == was0
    finally:
        stop.set()


def test_peer_refuses_to_attach_over_its_vms_refused_file(standin, tmp_path):
    state, path = plant(tmp_path, process_id(standin.pid), (), data=b"[]")
    proc = host("run", "--qmp", standin.qmp, "--state-dir", state,
                "--channel", str(tmp_path / "hints.sock"), "--status-socket", str(tmp_path / "s"))
    assert proc.returncode == 1 and "resolve it first" in proc.stderr
    assert "refused" in proc.stderr and os.path.exists(path)


def test_file_of_a_running_peer_or_a_gone_qemu(standin, tmp_path):
    t0 = standin.tids[0]
    was0 = boosted(t0)
    qemu = process_id(standin.pid)
    state, path = plant(tmp_path, qemu, [record_of(0, standin.pid, t0)],
                        peer=process_id(os.getpid()))  # "this test" is the running peer
    proc = host("restore", "--state-dir", state)
    assert proc.returncode == 0 and "in use" in proc.stdout and os.path.exists(path)
    assert kernel(t0) == was0
    os.unlink(path)
    _, gone = plant(tmp_path, ProcessId(qemu.pid, qemu.start_time + 1),
                    [record_of(0, standin.pid, t0)])  # a QEMU that exited, pid reused
    proc = host("restore", "--state-dir", state)
    assert proc.returncode == 0 and "is gone" in proc.stdout and not os.path.exists(gone)
    assert kernel(t0) == was0


def test_applier_records_before_the_first_change_and_forgets_after_restore(standin, tmp_path):
    pid, threads = discover(standin.qmp)
    t0 = standin.tids[0]
    before = kernel(t0)
    journal = UndoJournal(str(tmp_path), process_id(pid), process_id(os.getpid()))
    applier = ThreadApplier(pid, threads, dry_run=False, log=print, journal=journal)
    fifo = ThreadSettings(os.SCHED_FIFO, 10, before.nice, before.affinity)
    got = applier.apply(0, fifo)
    assert (got.policy & 0xFF, got.rt_priority) == (os.SCHED_FIFO, 10)
    record = json.loads(open(journal.path).read())
    assert [(t["vcpu"], t["tid"], t["policy"]) for t in record["threads"]] == [
        (0, t0, os.SCHED_OTHER)]
    applier.restore_all()
    assert kernel(t0) == before and not os.path.exists(journal.path)

    logs = []
    nowhere = UndoJournal(str(tmp_path / "missing"), process_id(pid), process_id(os.getpid()))
    applier = ThreadApplier(pid, threads, dry_run=False, log=logs.append, journal=nowhere)
    assert applier.apply(0, fifo) is None and kernel(t0) == before  # not recorded: untouched
    assert "cannot record" in logs[0]


def test_decode_refuses_what_encode_never_writes():
    rec = ThreadRecord(0, ProcessId(10, 5), ThreadSettings(os.SCHED_RR, 5, 0, frozenset({1})))
    record = UndoRecord(ProcessId(2, 1), ProcessId(3, 4), (rec,))
    assert decode(encode(record)) == record
    io = replace(rec, vcpu=iothread_index(1), thread=ProcessId(11, 5))  # an iothread
    assert decode(encode(replace(record, threads=(rec, io)))).threads[1].vcpu == -3
    doc = json.loads(encode(record))
    bad = [
        ({**doc, "extra": 1}, "unknown key"),
        ({**doc, "threads": [doc["threads"][0]] * 2}, "appears twice"),
        ({**doc, "threads": [{**doc["threads"][0], "nice": -21}]}, "out of range"),
        ({**doc, "threads": [{**doc["threads"][0], "policy": 4}]}, "not a scheduling"),
        ({**doc, "threads": [{**doc["threads"][0], "affinity": []}]}, "affinity"),
        ({**doc, "qemu": [3, 4]}, "qemu: expected an object"),
        ({**doc, "format": "other"}, "format"),
        ({**doc, "threads": [{**doc["threads"][0], "vcpu": LOWEST_INDEX - 1}]}, "out of range"),
    ]
    for value, message in bad:
        with pytest.raises(StateError, match=message):
            decode(json.dumps(value).encode())


def test_judge_thread():
    rec = ThreadRecord(0, ProcessId(10, 5), OTHER)
    assert judge_thread(3, rec, 5, 5) == RESTORE
    assert judge_thread(3, rec, 6, 6) == RECYCLED
    assert judge_thread(3, rec, None, None) == GONE
    assert judge_thread(3, rec, None, 7) == RECYCLED  # the tid went to another process
    with pytest.raises(StateError, match="another process"):
        judge_thread(3, rec, None, 5)
    with pytest.raises(StateError, match="main thread"):
        judge_thread(10, rec, 5, 5)
