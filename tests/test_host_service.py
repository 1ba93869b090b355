"""The host service core over real threads: two stand-in QEMUs, one arbiter between them.

Each stand-in is a real process with threads named `CPU n/KVM`; the guests' side
is a ScriptedLink per VM. The arbiter's caps and budgets, the emulator thread,
the release of a VM that goes away and the status document are checked
against what the kernel reports for those threads.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
from helpers.scripted import LIMITS, ScriptedLink, fifo
from helpers.standin import Standin, policy

from guestagent.host.applier import ThreadApplier
from guestagent.host.arbiter import EMULATOR, ArbiterLimits, Verdict
from guestagent.host.decide import initial_plan
from guestagent.host.discovery import VcpuThread, discover, thread_start_time
from guestagent.host.peer import HostPeer
from guestagent.host.serve import (
    follow_hotplug,
    format_service,
    iothread_threads,
    metrics_text,
    service_document,
)
from guestagent.host.service import HostService, boost_requests, withhold
from guestagent.host.settings import ThreadSettings
from guestagent.host.undo import iothread_index
from guestagent.host.vms import VmDescription
from guestagent.protocol.model import AppliedFlag
from guestagent.sched import SCHED_RESET_ON_FORK

FIFO = os.SCHED_FIFO
OTHER = (os.SCHED_OTHER, 0)
CPUS = frozenset(os.sched_getaffinity(0))


def test_withhold_returns_ungranted_boosts_to_the_original_keeping_a_pin():
    orig = {0: ThreadSettings(0, 0, 0, CPUS), 1: ThreadSettings(0, 0, 0, CPUS)}
    plan = initial_plan(orig)
    boosted = ThreadSettings(FIFO, 40, 0, frozenset({0}))
    flags = AppliedFlag.BOOSTED | AppliedFlag.CLAMPED | AppliedFlag.PINNED
    plan = replace(plan, vcpus={0: replace(plan.vcpus[0], settings=boosted, applied=flags),
                                1: replace(plan.vcpus[1], settings=replace(boosted,
                                                                           affinity=CPUS),
                                           applied=AppliedFlag.BOOSTED)})
    out = withhold(plan, orig, {0: Verdict.SPENT, 1: Verdict.GRANTED})
    assert out.vcpus[0].settings == replace(orig[0], affinity=frozenset({0}))
    assert out.vcpus[0].applied == (AppliedFlag.PINNED | AppliedFlag.DENIED
                                    | AppliedFlag.BUDGET_SPENT)
    assert out.vcpus[1] == plan.vcpus[1]
    out = withhold(plan, orig, {0: Verdict.HOST_CAP})
    assert not out.vcpus[0].applied & AppliedFlag.BUDGET_SPENT
    companions = {EMULATOR: orig[0], iothread_index(0): orig[0]}
    reqs = boost_requests("a", plan, "follow", companions)
    assert [(r.key.index, r.priority) for r in reqs] == [(0, 40), (1, 40), (EMULATOR, 40),
                                                         (iothread_index(0), 40)]
    assert [r.key.index for r in boost_requests("a", plan, "never", companions)] == [0, 1]
    assert boost_requests("a", initial_plan(orig), "follow", companions) == []


class Vms:
    """Stand-in QEMUs as the service's attach function sees them."""

    def __init__(self, tmp_path, mode="sleep"):
        self.tmp_path = tmp_path
        self.mode = mode
        self.standins: dict[str, Standin] = {}
        self.links: dict[str, ScriptedLink] = {}
        self.logs: list[str] = []

    def log(self, msg, priority=None):
        self.logs.append(msg)

    def start(self, name, nr=2, iothreads=0):
        s = Standin(str(self.tmp_path / f"{name}.qmp"), nr, self.mode, iothreads=iothreads)
        self.standins[name] = s
        return VmDescription(name, "test", s.pid, channel=f"/nonexistent/{name}", accel="tcg",
                             qmp=s.qmp, iothread_ids=tuple(sorted(s.iothreads)))

    def attach(self, desc):
        s = self.standins[desc.name]
        pid, threads = discover(s.qmp)
        emu = VcpuThread(EMULATOR, pid, thread_start_time(pid, pid))
        applier = ThreadApplier(pid, threads + (emu,) + iothread_threads(desc, pid),
                                dry_run=False, log=self.log)
        link = self.links.setdefault(desc.name, ScriptedLink())
        return HostPeer(applier, replace(LIMITS, max_boosted=2), CPUS, link, self.log)

    def close(self):
        for s in self.standins.values():
            s.stop()


@pytest.fixture
def vms(tmp_path):
    v = Vms(tmp_path)
    yield v
    v.close()


def service(vms, **limits):
    return HostService(vms.attach, ArbiterLimits(**limits), CPUS, lambda accel: "follow",
                       vms.log)


@pytest.mark.root
def test_host_cap_holds_across_two_vms_and_the_emulator_rides_along(vms):
    a, b = vms.start("a"), vms.start("b")
    svc = service(vms, per_cpu=2, host=2, per_vm=1, budget=5.0)
    svc.update({"a": a, "b": b})
    assert len(svc.served()) == 2
    now = time.monotonic()
    # Hostile guests: every vCPU FIFO 99.
    vms.links["a"].guest(fifo(0, 99), fifo(1, 99), now=now)
    vms.links["b"].guest(fifo(0, 99), fifo(1, 99), now=now)
    svc.step(now)
    sa, sb = vms.standins["a"], vms.standins["b"]
    states = {(vm, v): policy(s.tids[v]) for vm, s in (("a", sa), ("b", sb)) for v in (0, 1)}
    boosted = [k for k, p in states.items() if p[0] == FIFO]
    assert boosted == [("a", 0)]  # per-VM share 1; the host's second slot is a's emulator
    assert policy(sa.tids[0]) == (FIFO, 40)  # clamped to the per-VM limit
    assert policy(sa.pid) == (FIFO, 40)  # the emulator thread follows its VM's vCPU
    assert policy(sb.pid) == OTHER
    pa = svc.vms["a"].peer.plan.vcpus
    assert pa[1].applied & AppliedFlag.DENIED and not pa[1].applied & AppliedFlag.BOOSTED
    assert svc.vms["b"].peer.plan.vcpus[0].applied & AppliedFlag.DENIED
    assert svc.vms["b"].verdicts[0] == Verdict.HOST_CAP.value
    doc = service_document(svc, now)
    assert doc["boosted"] == ["a:0", "a:emulator"]
    text = format_service(doc)
    assert "host cap" in text and "emu" in text
    # VM a goes away: everything it had is restored, and b gets the slots.
    vms.standins["a"].stop()
    svc.update({"b": b})
    assert "a" not in svc.vms and all(k.vm != "a" for k in svc.budgets)
    svc.step(now + 0.01)
    assert policy(sb.tids[0]) == (FIFO, 40) and policy(sb.pid) == (FIFO, 40)
    svc.release_all()
    assert policy(sb.tids[0]) == OTHER and policy(sb.pid) == OTHER


@pytest.mark.root
def test_iothreads_ride_along_with_the_emulator_inside_the_caps_and_are_restored(vms):
    a = vms.start("a", iothreads=2)
    sa = vms.standins["a"]
    io0, io1 = sa.iothreads["iothread0"], sa.iothreads["iothread1"]
    # Four slots: vCPU 0, the emulator thread and one iothread; the host cap stops the other.
    svc = service(vms, per_cpu=2, host=3, per_vm=1, budget=5.0)
    svc.update({"a": a})
    assert svc.vms["a"].peer.applier.tids()[iothread_index(1)] == io1  # found over QMP
    now = time.monotonic()
    vms.links["a"].guest(fifo(0, 99), fifo(1, 99), now=now)
    svc.step(now)
    assert policy(sa.tids[0]) == (FIFO, 40) and policy(sa.pid) == (FIFO, 40)
    assert policy(io0) == (FIFO, 40) and policy(io1) == OTHER
    assert os.sched_getscheduler(io0) & SCHED_RESET_ON_FORK
    verdicts = svc.vms["a"].verdicts
    assert verdicts[iothread_index(0)] == "granted"
    assert verdicts[iothread_index(1)] == Verdict.HOST_CAP.value
    doc = service_document(svc, now)
    assert doc["boosted"] == ["a:0", "a:emulator", "a:iothread0"]
    ios = doc["vms"][0]["iothreads"]
    assert [(t["name"], t["tid"], t["boosted"]) for t in ios] == [
        ("iothread0", io0, True), ("iothread1", io1, False)]
    assert "io0" in format_service(doc)
    assert 'thread="iothread0"' in metrics_text(svc)
    # The guest stops asking: the iothread goes back with the vCPU and the emulator.
    vms.links["a"].guest(now=now + 0.2)
    svc.step(now + 0.2)
    assert policy(io0) == OTHER and policy(sa.pid) == OTHER
    vms.links["a"].guest(fifo(0, 99), now=now + 0.4)
    svc.step(now + 0.4)
    assert policy(io0) == (FIFO, 40)
    svc.release_all()
    assert all(policy(t) == OTHER for t in (io0, io1, sa.pid, sa.tids[0]))


@pytest.mark.root
def test_a_hot_plugged_vcpu_is_followed_without_reverting_the_others(vms):
    # A drop-in VM (its vCPU threads found by name on each rescan) gets a vCPU plugged
    # while vCPU 0 and the emulator thread are boosted: the service takes the new thread
    # on in place; vCPU 0 stays boosted throughout, and the new vCPU is served.
    desc = replace(vms.start("a", nr=1), vcpus=())
    s = vms.standins["a"]
    svc = service(vms, per_cpu=2, host=4, per_vm=2, budget=5.0)
    svc.update({"a": desc})
    link = vms.links["a"]
    now = time.monotonic()
    link.guest(fifo(0, 99), now=now)
    svc.step(now)
    assert policy(s.tids[0]) == (FIFO, 40) and policy(s.pid) == (FIFO, 40)
    peer = svc.vms["a"].peer
    new = s.hotplug()
    assert new == 1
    found = {"a": desc}
    follow_hotplug(svc, found)
    svc.update(found)
    assert svc.vms["a"].peer is peer  # the same peer: nothing released
    assert policy(s.tids[0]) == (FIFO, 40) and policy(s.pid) == (FIFO, 40)
    assert peer.applier.tids()[1] == s.tids[1]
    assert any("following hot-plugged vCPU 1" in line for line in vms.logs), vms.logs
    link.guest(fifo(0, 99), fifo(1, 99), now=now + 0.2)
    svc.step(now + 0.2)
    assert policy(s.tids[1]) == (FIFO, 40) and policy(s.tids[0]) == (FIFO, 40)
    # A rescan that finds the same threads changes nothing.
    found = {"a": desc}
    follow_hotplug(svc, found)
    svc.update(found)
    assert svc.vms["a"].peer is peer
    svc.release_all()
    assert all(policy(t) == OTHER for t in (s.pid, *s.tids.values()))


@pytest.mark.root
def test_budget_runs_out_for_a_spinning_vcpu_and_comes_back(tmp_path):
    vms = Vms(tmp_path, mode="spin")
    try:
        a = vms.start("a", nr=1)
        svc = service(vms, per_cpu=1, host=2, per_vm=1, budget=0.2)
        svc.update({"a": a})
        tid = vms.standins["a"].tids[0]
        link = vms.links["a"]
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            now = time.monotonic()
            link.guest(fifo(0, 1), now=now)
            nxt = svc.step(now)
            flags = svc.vms["a"].peer.plan.vcpus[0].applied
            seen.append((flags, policy(tid)[0]))
            if any(f & AppliedFlag.BUDGET_SPENT for f, _ in seen) and flags & AppliedFlag.BOOSTED:
                break
            time.sleep(max(0.0, min(0.05, (nxt or now + 0.05) - time.monotonic())))
        spent = [(f, p) for f, p in seen if f & AppliedFlag.BUDGET_SPENT]
        assert spent, f"budget never ran out: {seen[-3:]}"
        assert all(p == os.SCHED_OTHER and f & AppliedFlag.DENIED for f, p in spent)
        assert seen[-1][0] & AppliedFlag.BOOSTED, "budget never came back"
        b = svc.budgets[next(k for k in svc.budgets if k.index == 0)]
        assert b.exhaustions >= 1 and b.boosted_seconds > 0
        text = metrics_text(svc)
        assert 'guestagent_host_budget_exhaustions_total{vm="a",thread="0"}' in text
        svc.release_all()
        assert policy(tid) == OTHER
    finally:
        vms.close()


@pytest.mark.root
def test_a_vm_without_transport_is_listed_and_left_alone(vms):
    a = vms.start("a")
    bare = replace(a, channel=None)
    svc = service(vms)
    svc.update({"a": bare})
    assert svc.served() == [] and svc.vms["a"].error == "no hints channel or region"
    assert any("left alone" in line for line in vms.logs)
    doc = service_document(svc, time.monotonic())
    assert doc["vms"][0]["served"] is False
    assert "not served" in format_service(doc)


@pytest.mark.root
def test_attach_failure_is_retried_and_does_not_stop_others(vms):
    a = vms.start("a")
    ghost = VmDescription("ghost", "test", 999999999, channel="/x")
    svc = service(vms)
    svc.update({"a": a, "ghost": ghost})
    assert [n for n, _ in svc.served()] == ["a"]
    assert "cannot attach" in "\n".join(vms.logs)
    svc.update({"a": a, "ghost": ghost})  # retried, said once
    assert sum("cannot attach" in line for line in vms.logs) == 1
    svc.release_all()
