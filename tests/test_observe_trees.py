"""The observer against recorded /proc and /sys trees of shapes this machine lacks
(tests/data/trees/, written by generate.py there)."""

from __future__ import annotations

import os
import shutil

import pytest

from guestagent.observe import Observer, RecordedKernel, pinned_critical
from guestagent.protocol.model import SchedClass

TREES = os.path.join(os.path.dirname(__file__), "data", "trees")


def snap_of(name: str, now: float = 100.0, root: str = ""):
    with Observer(RecordedKernel(root or os.path.join(TREES, name))) as obs:
        return obs.snapshot(now)


def by_tid(snap):
    return {t.tid: t for t in snap.threads}


def test_64_vcpus_with_isolcpus_nohz_full_and_partition():
    snap = snap_of("vm64")
    cpus = snap.cpus
    assert cpus.possible == cpus.online == frozenset(range(64))
    assert cpus.isolated == cpus.nohz_full == frozenset(range(56, 64))
    assert cpus.partitions == frozenset(range(48, 56))  # rt.slice; system.slice is "member"
    assert cpus.offline == frozenset()
    assert set(cpus.steal) == set(range(64)) and set(cpus.steal.values()) == {0.0}
    assert all(len(i.counts) == 64 for i in snap.irqs)


def test_64_vcpus_threads_and_pinned_work():
    snap = snap_of("vm64")
    t = by_tid(snap)
    assert (t[4101].policy, t[4101].rt_priority, t[4101].affinity) == \
        (SchedClass.FIFO, 95, frozenset({60}))
    assert t[4101].exe == "/usr/bin/cyclictest" and t[4101].unit == "cyclictest.service"
    assert 4100 not in t  # plain OTHER thread, nice 0: not read
    assert (t[900].policy, t[900].nice) == (SchedClass.OTHER, -5)
    assert (t[1500].policy, t[1500].nice, t[1501].policy) == \
        (SchedClass.BATCH, 10, SchedClass.IDLE)
    assert t[1600].policy == SchedClass.RR and t[1600].affinity == frozenset(range(48, 56))
    assert snap.nr_threads == sum(
        len(os.listdir(os.path.join(TREES, "vm64", "proc", p, "task")))
        for p in os.listdir(os.path.join(TREES, "vm64", "proc")) if p.isdigit())
    pinned = pinned_critical(snap)
    # migration/N are FIFO 99 and pinned, but per-CPU kthreads say nothing about the load
    assert set(pinned) == {60, 61}
    assert "cyclictest" in pinned[60][0] and "FIFO 95" in pinned[60][0]


def test_nvme_queues_on_64_vcpus():
    irqs = {i.irq: i for i in snap_of("vm64").irqs}
    q3 = irqs[27]
    assert (q3.chip, q3.hwirq, q3.actions) == ("PCI-MSIX-0000:00:04.0", "3-edge", ("nvme0q3",))
    assert q3.affinity == frozenset(range(16, 24)) and q3.effective_affinity == {16}
    assert q3.counts[16] == 3000 and q3.total == 3000
    assert not q3.threads and not q3.netdevs


def test_virtio_nic_queues_mapped_by_device_name_fallback():
    # vm64's eth0 has no msi_irqs entries; its queues are found by action name only when
    # the device is virtio, so nothing maps here: virtio1-* does not name eth0
    irqs = snap_of("vm64").irqs
    assert not any(i.netdevs for i in irqs)


def test_offline_cpus_place_counts_by_cpu_number():
    snap = snap_of("offline")
    cpus = snap.cpus
    assert cpus.possible == frozenset(range(8))
    assert cpus.online == frozenset({0, 1, 2, 3, 6})
    assert cpus.offline == frozenset({4, 5, 7})
    assert set(cpus.steal) == {0, 1, 2, 3, 6}
    i8042 = next(i for i in snap.irqs if i.irq == 1)
    assert i8042.counts == (9, 0, 0, 0, 0, 0, 2)  # column 5 is CPU6
    assert pinned_critical(snap) == {6: ("thread 700 'rtapp' FIFO 50 pinned here",)}
    assert cpus.nohz_full == frozenset()  # file absent: kernel without NO_HZ_FULL


def test_preempt_rt_irq_threads_matched_on_number_despite_truncation():
    irqs = {i.irq: i for i in snap_of("preempt-rt").irqs}
    assert [t.comm for t in irqs[131].threads] == ["irq/131-eth0-Tx"]
    assert [t.comm for t in irqs[135].threads] == ["irq/135-eth0"]
    assert sorted(t.comm for t in irqs[16].threads) == ["irq/16-ehci_hcd", "irq/16-s-ehci_h"]
    assert irqs[16].actions == ("ehci_hcd:usb1", "snd_hda_intel")
    assert all(t.policy == SchedClass.FIFO for i in irqs.values() for t in i.threads)
    assert all(i.threads for i in irqs.values())  # PREEMPT_RT threads every handler


def test_multiqueue_nic_from_msi_irqs():
    irqs = {i.irq: i for i in snap_of("preempt-rt").irqs}
    assert {n for n, i in irqs.items() if i.netdevs} == {131, 132, 133, 134, 135}
    assert irqs[133].netdevs == ("eth0",)


def test_preempt_rt_pinned_work_and_deadline():
    snap = snap_of("preempt-rt")
    t = by_tid(snap)
    assert (t[3000].policy, t[3000].dl_runtime, t[3000].dl_deadline, t[3000].dl_period) == \
        (SchedClass.DEADLINE, 500_000, 1_000_000, 1_000_000)
    assert t[10].is_percpu_kthread and not t[200].is_percpu_kthread
    pinned = pinned_critical(snap)
    assert set(pinned) == {0, 1, 2, 3}
    assert not any("ktimers" in r or "rcuc" in r for rs in pinned.values() for r in rs)
    assert any("irq 16 " in r for r in pinned[2])
    assert snap.cpus.nohz_full == frozenset()  # present but empty ("(null)")


def test_rates_between_sweeps(tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(os.path.join(TREES, "offline"), root, symlinks=True)
    with Observer(RecordedKernel(str(root))) as obs:
        first = obs.snapshot(10.0)
        assert all(i.rate == 0.0 for i in first.irqs)
        text = (root / "proc" / "interrupts").read_text()
        (root / "proc" / "interrupts").write_text(
            text.replace("          9          0", "        509          0", 1))
        stat = (root / "proc" / "stat").read_text()
        (root / "proc" / "stat").write_text(stat.replace("cpu6 4006 0 2000 90000 100 0 30 42",
                                                         "cpu6 4006 0 2000 90000 100 0 30 92"))
        second = obs.snapshot(12.0)
    rates = {i.irq: i.rate for i in second.irqs}
    assert rates == {1: 250.0, 9: 0.0}
    assert second.cpus.steal[6] == pytest.approx(0.25)  # 50 ticks at 100 Hz over 2 s
    assert second.cpus.steal[0] == 0.0


def test_unreadable_parts_become_notes(tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(os.path.join(TREES, "preempt-rt"), root, symlinks=True)
    (root / "proc" / "interrupts").unlink()
    (root / "proc" / "stat").write_text("cpu0 garbage\n")
    (root / "proc" / "10" / "task" / "10" / "stat").write_bytes(b"10 no parens here\n")
    snap = snap_of("", root=str(root))
    assert snap.irqs == ()
    assert any("/proc/interrupts unreadable" in n for n in snap.notes)
    assert any("/proc/stat unreadable" in n for n in snap.notes)
    assert 10 not in by_tid(snap) and 11 in by_tid(snap)
    assert all("\n" not in n for n in snap.notes)


class ExeDenied(RecordedKernel):
    """A tree where every process's executable link is unreadable (EACCES)."""

    def readlink(self, path: str) -> str:
        if path.endswith("/exe"):
            raise PermissionError(13, "Permission denied", path)
        return super().readlink(path)


@pytest.mark.parametrize("paths", [True, False])
def test_unreadable_exe_paths_are_said_only_by_views_that_show_paths(paths):
    with Observer(ExeDenied(os.path.join(TREES, "vm64")), paths=paths) as obs:
        snap = obs.snapshot(100.0)
    said = any("executable paths" in n for n in snap.notes)
    assert said == paths, snap.notes
    assert all(t.exe == "" for t in snap.threads)


def test_rules_that_match_on_paths_still_read_them_when_views_do_not_show_them():
    with Observer(ExeDenied(os.path.join(TREES, "vm64")), interest=lambda ident: False,
                  paths=False) as obs:
        snap = obs.snapshot(100.0)
    assert any("executable paths" in n for n in snap.notes)
