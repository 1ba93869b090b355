"""The RT cgroup trap: detection, the grant down the chain, the journal, restore.

The pure parts are tested on values; the rest on real cgroup v1 directories
under /sys/fs/cgroup/cpu, with a real thread that is refused SCHED_FIFO (EPERM)
until its chain has a budget.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from dataclasses import replace

import pytest
from helpers.standin import MainLoopThread

from guestagent.host.applier import ThreadApplier, read_settings
from guestagent.host.arbiter import EMULATOR
from guestagent.host.cgroup import (
    CgroupFs,
    CgroupGranter,
    CgroupJournal,
    CgroupRecord,
    chain,
    cpu_cgroup,
    cpu_mount,
    decode_record,
    encode_record,
    plan_grant,
    restore_record,
    trap,
)
from guestagent.host.discovery import VcpuThread, thread_start_time
from guestagent.host.serve import restore_cgroup_leftovers
from guestagent.host.undo import ProcessId, StateError

MOUNTINFO = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
"""


def test_find_the_v1_cpu_controller_and_a_threads_cgroup():
    assert cpu_mount(MOUNTINFO) == "/sys/fs/cgroup/cpu"
    assert cpu_mount("32 31 0:29 / /x rw - cgroup cgroup rw,cpu,cpuacct\n") == "/x"
    assert cpu_mount("0 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n") is None
    text = "4:memory:/x\n2:cpu,cpuacct:/machine/qemu-1-a.libvirt-qemu/vcpu0\n0::/\n"
    assert cpu_cgroup(text) == "/machine/qemu-1-a.libvirt-qemu/vcpu0"
    assert cpu_cgroup("0::/\n") is None
    assert chain("/a/b/c") == ["/a", "/a/b", "/a/b/c"] and chain("/") == []


def test_trap_names_the_thread_cgroup_and_the_zero_above_it():
    t = trap("/machine/dom/vcpu0", {"/machine": 0, "/machine/dom": 0, "/machine/dom/vcpu0": 0})
    assert (t.cgroup, t.zero) == ("/machine/dom/vcpu0", "/machine")
    assert "EPERM" in t.describe() and "/machine/dom/vcpu0 (via /machine)" in t.describe()
    assert trap("/machine/dom/vcpu0", {"/machine": 100, "/machine/dom": 100,
                                       "/machine/dom/vcpu0": 50}) is None
    assert trap("/", {}) is None


TREE = {"/machine": ["/machine/a", "/machine/b"], "/machine/a": ["/machine/a/vcpu0",
                                                                   "/machine/a/vcpu1"]}


def test_grant_fills_the_chain_each_parent_at_least_its_children():
    cur = {"/machine": 0, "/machine/a": 0, "/machine/b": 0, "/machine/a/vcpu0": 0,
           "/machine/a/vcpu1": 0}
    g = plan_grant(["/machine/a/vcpu0", "/machine/a/vcpu1"], cur, TREE, cur, 50_000, 200_000)
    assert g.writes == (("/machine", 100_000), ("/machine/a", 100_000),
                        ("/machine/a/vcpu0", 50_000), ("/machine/a/vcpu1", 50_000))
    assert g.granted == 100_000 and g.refused == ()


def test_grant_stays_within_the_total_and_keeps_siblings():
    cur = {"/machine": 30_000, "/machine/a": 0, "/machine/b": 30_000,
           "/machine/a/vcpu0": 0, "/machine/a/vcpu1": 0}
    g = plan_grant(["/machine/a/vcpu0", "/machine/a/vcpu1"], cur, TREE, cur, 50_000, 60_000)
    # /machine must hold b's 30 ms and a's grant: only one vCPU fits in 60 ms more.
    assert dict(g.writes)["/machine"] == 80_000 and g.refused == ("/machine/a/vcpu1",)
    assert g.granted == 50_000


def test_grant_never_lowers_what_a_cgroup_had():
    cur = {"/machine": 500_000, "/machine/a": 0, "/machine/a/vcpu0": 0}
    g = plan_grant(["/machine/a/vcpu0"], cur, TREE, cur, 50_000, 10)
    assert "/machine" not in dict(g.writes) and g.granted == 0 and not g.refused


def test_journal_record_round_trip_and_refusals():
    rec = CgroupRecord(ProcessId(5, 7), {"/machine": 0, "/machine/a": -1})
    assert decode_record(encode_record(rec)) == rec
    for bad in (b"{", b"[]", b'{"format": "x"}',
                encode_record(rec).replace(b'"/machine/a"', b'"../etc"'),
                encode_record(rec).replace(b"-1", b"-5"),
                encode_record(rec).replace(b'"pid": 5', b'"pid": true')):
        with pytest.raises(StateError):
            decode_record(bad)


# --- real cgroup v1 directories ----------------------------------------------------------

@pytest.fixture
def cgfs():
    fs = CgroupFs.find()
    if fs is None:
        pytest.skip("needs a cgroup v1 cpu controller with cpu.rt_runtime_us "
                    "(CONFIG_RT_GROUP_SCHED)")
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    top = f"/ga-test-{uuid.uuid4().hex[:8]}"
    made = []
    for node in (top, f"{top}/dom", f"{top}/dom/vcpu0", f"{top}/dom/vcpu1", f"{top}/other"):
        os.mkdir(fs._dir(node))
        made.append(node)
    yield fs, top
    for node in reversed(made):  # children first; move any thread left back to the root
        for tasks in (os.path.join(fs._dir(node), "tasks"),):
            try:
                with open(tasks) as f:
                    for tid in f.read().split():
                        with open(os.path.join(fs.mount, "tasks"), "w") as root:
                            root.write(tid)
            except OSError:
                pass
        try:
            os.rmdir(fs._dir(node))
        except OSError:
            pass


class ParkedThread:
    """A real thread that waits, so its scheduling policy can be changed from outside."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        ready = threading.Event()
        self.tid = 0

        def body():
            self.tid = threading.get_native_id()
            ready.set()
            self.stop.wait()

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
        ready.wait(30)

    def close(self):
        self.stop.set()
        self.thread.join(30)


def _move(fs: CgroupFs, cgroup: str, tid: int) -> None:
    with open(os.path.join(fs._dir(cgroup), "tasks"), "w") as f:
        f.write(str(tid))


def _try_fifo(tid: int) -> OSError | None:
    try:
        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
    except OSError as err:
        return err
    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    return None


@pytest.mark.root
def test_real_trap_then_grant_then_restore(cgfs, tmp_path):
    fs, top = cgfs
    leaf = f"{top}/dom/vcpu0"
    t = ParkedThread()
    try:
        _move(fs, leaf, t.tid)
        assert fs.thread_cgroup(os.getpid(), t.tid) == leaf
        found = trap(leaf, fs.chain_runtimes(leaf))
        assert found is not None and found.zero == top
        err = _try_fifo(t.tid)
        assert err is not None and err.errno == 1  # EPERM: the trap, for real

        os.chmod(tmp_path, 0o700)
        journal = CgroupJournal(str(tmp_path), ProcessId(os.getpid(), 1))
        granter = CgroupGranter(fs, journal, per_thread=20_000, total=30_000)
        assert granter.grant(leaf) is None
        assert (fs.runtime(top), fs.runtime(f"{top}/dom"), fs.runtime(leaf)) == (
            20_000, 20_000, 20_000)
        assert granter.used == 20_000
        assert _try_fifo(t.tid) is None  # granted: FIFO works now
        # The old values are on disk before the change.
        on_disk = decode_record(open(journal.path, "rb").read())
        assert on_disk.originals == {top: 0, f"{top}/dom": 0, leaf: 0}
        # Over the total: refused with one line, nothing written.
        why = granter.grant(f"{top}/dom/vcpu1")
        assert why and "used up" in why and fs.runtime(f"{top}/dom/vcpu1") == 0

        lines = granter.release()
        assert (fs.runtime(top), fs.runtime(f"{top}/dom"), fs.runtime(leaf)) == (0, 0, 0)
        assert any("20000 -> 0" in line for line in lines)
        assert not os.path.exists(journal.path)
        assert _try_fifo(t.tid) is not None
    finally:
        _move(fs, "/", t.tid)
        t.close()


@pytest.mark.root
def test_real_restore_after_a_crash_from_the_journal_alone(cgfs, tmp_path):
    fs, top = cgfs
    leaf = f"{top}/dom/vcpu1"
    journal = CgroupJournal(str(tmp_path), ProcessId(os.getpid(), 1))
    granter = CgroupGranter(fs, journal, per_thread=10_000, total=50_000)
    assert granter.grant(leaf) is None
    assert fs.runtime(top) == 10_000
    # The service is killed: only the file remains. A new one restores from it.
    record = decode_record(open(journal.path, "rb").read())
    restored = restore_record(fs, record)
    assert (fs.runtime(top), fs.runtime(f"{top}/dom"), fs.runtime(leaf)) == (0, 0, 0)
    assert len(restored.lines) == 3 and not restored.failed


@pytest.mark.root
def test_real_release_of_one_vm_keeps_the_other_granted(cgfs, tmp_path):
    fs, top = cgfs
    journal = CgroupJournal(str(tmp_path), ProcessId(os.getpid(), 1))
    granter = CgroupGranter(fs, journal, per_thread=10_000, total=50_000)
    assert granter.grant(f"{top}/dom/vcpu0", "vm1") is None
    assert granter.grant(f"{top}/other", "vm2") is None
    assert fs.runtime(top) == 20_000
    granter.release("vm1")
    assert (fs.runtime(f"{top}/dom/vcpu0"), fs.runtime(f"{top}/dom")) == (0, 0)
    assert (fs.runtime(top), fs.runtime(f"{top}/other")) == (10_000, 10_000)
    granter.release()
    assert fs.runtime(top) == 0 and not os.path.exists(journal.path)


def _fifo_applier(thread_tid: int, index: int) -> tuple[ThreadApplier, object]:
    applier = ThreadApplier(os.getpid(), [VcpuThread(
        index, thread_tid, thread_start_time(os.getpid(), thread_tid))], False, print)
    before = read_settings(thread_tid)
    return applier, before


@pytest.mark.root
def test_real_shared_parent_is_restored_exactly_when_vms_go_one_by_one(cgfs, tmp_path):
    # Two VMs granted through one parent (libvirt's /machine). VM 2's emulator thread,
    # boosted, creates a worker thread meanwhile, as QEMU's main loop does. VM 1 goes
    # away, then the service stops: every runtime is back to what it was, nothing stays
    # recorded. (A worker that inherited FIFO kept VM 2's cgroup, and so the parent,
    # at its grant: the kernel refuses to take RT runtime from a cgroup with an RT thread.)
    fs, top = cgfs
    vm1, vm2 = f"{top}/dom/vcpu0", f"{top}/other"
    before = {c: fs.runtime(c) for c in (top, f"{top}/dom", vm1, vm2)}
    vcpu, main = ParkedThread(), MainLoopThread(keep=True)
    try:
        _move(fs, vm1, vcpu.tid)
        _move(fs, vm2, main.tid)
        os.chmod(tmp_path, 0o700)
        granter = CgroupGranter(fs, CgroupJournal(str(tmp_path), ProcessId(os.getpid(), 1)),
                                per_thread=10_000, total=50_000)
        assert granter.grant(vm1, "vm1") is None and granter.grant(vm2, "vm2") is None
        assert fs.runtime(top) == 20_000
        a1, b1 = _fifo_applier(vcpu.tid, 0)
        a2, b2 = _fifo_applier(main.tid, EMULATOR)
        assert a1.apply(0, replace(b1, policy=os.SCHED_FIFO, rt_priority=1))
        assert a2.apply(EMULATOR, replace(b2, policy=os.SCHED_FIFO, rt_priority=1))
        worker = main.spawn()
        assert worker is not None and worker[0] & 0xFF == os.SCHED_OTHER, worker
        # VM 1 goes away: its threads first, then its cgroups; VM 2 keeps its share.
        a1.restore_all()
        assert granter.release("vm1") and fs.runtime(vm1) == 0
        assert (fs.runtime(top), fs.runtime(vm2)) == (10_000, 10_000)
        # The service stops.
        a2.restore_all()
        lines = granter.release()
        assert not any("cannot" in line for line in lines), lines
        assert {c: fs.runtime(c) for c in before} == before
        assert not os.path.exists(granter.journal.path)
    finally:
        main.close()
        vcpu.close()


@pytest.mark.root
def test_real_restore_after_a_kill_keeps_what_the_kernel_refuses_and_retries(cgfs, tmp_path):
    # Killed with a thread still RT in a granted cgroup (say its state file was refused):
    # restore names the threads, keeps the journal, exits non-zero; once the thread is
    # back, the next restore (or the next service, which adopts the journal) is exact.
    fs, top = cgfs
    vm1, vm2 = f"{top}/dom/vcpu0", f"{top}/other"
    before = {c: fs.runtime(c) for c in (top, f"{top}/dom", vm1, vm2)}
    t = ParkedThread()
    try:
        _move(fs, vm2, t.tid)
        os.chmod(tmp_path, 0o700)
        dead = ProcessId(2 ** 22 - 1, 1)  # no such process: a killed service
        granter = CgroupGranter(fs, CgroupJournal(str(tmp_path), dead), 10_000, 50_000)
        assert granter.grant(vm1, "vm1") is None and granter.grant(vm2, "vm2") is None
        os.sched_setscheduler(t.tid, os.SCHED_FIFO, os.sched_param(1))
        out: list[str] = []
        left = restore_cgroup_leftovers(str(tmp_path), lambda m, *_: out.append(m))
        assert set(left) == {top, vm2}, out
        assert fs.runtime(vm1) == 0 and fs.runtime(top) == 10_000
        assert any(f"tids {t.tid}" in line and vm2 in line for line in out), out
        assert os.path.exists(granter.journal.path)
        # A new service adopts what is left and gives it back when it stops.
        os.sched_setscheduler(t.tid, os.SCHED_OTHER, os.sched_param(0))
        adopted = CgroupGranter(fs, CgroupJournal(str(tmp_path), ProcessId(os.getpid(), 1),
                                                  left), 10_000, 50_000)
        assert decode_record(open(adopted.journal.path, "rb").read()).originals == left
        adopted.release()
        assert {c: fs.runtime(c) for c in before} == before
        assert not os.path.exists(adopted.journal.path)
    finally:
        os.sched_setscheduler(t.tid, os.SCHED_OTHER, os.sched_param(0))
        _move(fs, "/", t.tid)
        t.close()


@pytest.mark.root
def test_real_cgroup_shared_by_two_vms_is_given_back_by_the_last(cgfs, tmp_path):
    fs, top = cgfs
    leaf = f"{top}/other"  # two drop-in QEMUs started in one cgroup
    granter = CgroupGranter(fs, CgroupJournal(str(tmp_path), ProcessId(os.getpid(), 1)),
                            10_000, 50_000)
    assert granter.grant(leaf, "a") is None and granter.grant(leaf, "b") is None
    granter.release("a")
    assert fs.runtime(leaf) == 10_000 and granter.holds(leaf)
    granter.release("b")
    assert (fs.runtime(leaf), fs.runtime(top)) == (0, 0)
    assert not os.path.exists(granter.journal.path)


def test_cgroupfs_reads_and_writes_plain_files(tmp_path):
    # The IO layer over a plain tree: a mount point is only a prefix.
    root = tmp_path / "cpu"
    (root / "a" / "b").mkdir(parents=True)
    for d in (root, root / "a", root / "a" / "b"):
        (d / "cpu.rt_runtime_us").write_text("0\n")
    fs = CgroupFs(str(root))
    assert fs.children("/a") == ["/a/b"] and fs.chain_runtimes("/a/b") == {"/a": 0, "/a/b": 0}
    fs.set_runtime("/a", 5)
    assert fs.runtime("/a") == 5 and fs.runtime("/missing") is None
    shutil.rmtree(root)
