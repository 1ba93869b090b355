"""The host service: every VM on the host, each served by its own HostPeer, one arbiter.

Each round every served VM's peer decides what its guest may have (plan_step);
the arbiter then withholds the RT boosts that would break a host-wide cap or a
spent budget, the emulator (main-loop) thread is boosted alongside its VM's
vCPUs where the policy says so, and each peer applies and publishes
(finish_step). VMs are found by rescan(): libvirt's status files and the
drop-ins; a VM that appears is attached, one that goes away is released
(threads restored, budgets forgotten, cgroup runtimes given back); a vCPU
hot-plugged into a served VM is taken on in place, and a VM whose description
changed otherwise (QEMU restarted) is released and attached again. The loop and its IO live in serve.py; this core takes its
attach function, cgroup granter, clock and log as arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Callable

from guestagent.errors import GuestagentError
from guestagent.host.arbiter import (
    ArbiterLimits,
    Arbitration,
    BoostRequest,
    Budget,
    ThreadKey,
    Verdict,
    arbitrate,
    forget_vm,
)
from guestagent.host.cgroup import CgroupFs, CgroupGranter, trap
from guestagent.host.decide import Plan, VcpuPlan
from guestagent.host.discovery import checked_threads
from guestagent.host.hostlog import ERR, NOTICE, WARNING
from guestagent.host.peer import HostPeer
from guestagent.host.settings import ThreadSettings
from guestagent.host.vms import VmDescription
from guestagent.protocol.model import AppliedFlag

Log = Callable[..., None]
Attach = Callable[[VmDescription], HostPeer]
WITHHELD = AppliedFlag.BOOSTED | AppliedFlag.CLAMPED


@dataclass
class VmEntry:
    """One VM the service knows of, served or not."""

    desc: VmDescription
    peer: HostPeer | None = None
    error: str | None = None  # why it is not served (attach failed), one line
    emulator: str = "never"  # the emulator policy in force for it
    trap: str | None = None  # the RT cgroup trap, said once
    trapped: dict[int, str] = field(default_factory=dict)  # thread -> cgroup refusing RT
    cgroups: set[str] = field(default_factory=set)  # cgroups granted RT runtime for it
    verdicts: dict[int, str] = field(default_factory=dict)  # thread -> last arbiter verdict


def schedstat_ns(pid: int, tid: int) -> int | None:
    """A thread's total run time in ns (first field of /proc/PID/task/TID/schedstat)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def withhold(plan: Plan, originals: Mapping[int, ThreadSettings], verdicts: Mapping[int, Verdict]
             ) -> Plan:
    """The plan with every RT boost the arbiter did not grant returned to the original
    settings (keeping a co-location pin), reported DENIED (and BUDGET_SPENT)."""
    vcpus: dict[int, VcpuPlan] = {}
    for vcpu, p in plan.vcpus.items():
        verdict = verdicts.get(vcpu)
        if verdict is None or verdict == Verdict.GRANTED:
            vcpus[vcpu] = p
            continue
        flags = (p.applied & ~WITHHELD) | AppliedFlag.DENIED
        if verdict == Verdict.SPENT:
            flags |= AppliedFlag.BUDGET_SPENT
        settings = replace(originals[vcpu], affinity=p.settings.affinity)
        vcpus[vcpu] = replace(p, settings=settings, applied=flags)
    return replace(plan, vcpus=vcpus)


def boost_requests(name: str, plan: Plan, emulator: str,
                   companions: Mapping[int, ThreadSettings]) -> list[BoostRequest]:
    """What this VM's plan would boost to RT; its companions (the emulator thread and
    the iothreads: index < 0 -> original settings) alongside, by the emulator policy."""
    out = [BoostRequest(ThreadKey(name, v), p.settings.rt_priority, p.settings.affinity)
           for v, p in sorted(plan.vcpus.items())
           if p.applied & AppliedFlag.BOOSTED and p.settings.is_rt]
    if out and emulator in ("follow", "always"):
        # At the VM's highest vCPU priority: its own spinning vCPU must not starve them.
        top = max(r.priority for r in out)
        out += [BoostRequest(ThreadKey(name, i), top, orig.affinity)
                for i, orig in sorted(companions.items(), reverse=True)]
    return out


def companions(peer: HostPeer) -> dict[int, ThreadSettings]:
    """A served VM's emulator thread and iothreads (index < 0), with their originals."""
    return {i: s for i, s in peer.applier.originals.items() if i < 0}


class HostService:
    """Every VM's peer and the arbiter between them."""

    def __init__(self, attach: Attach, limits: ArbiterLimits, pcpus: frozenset[int],
                 emulator_policy: Callable[[str], str], log: Log,
                 cgroups: CgroupFs | None = None, granter: CgroupGranter | None = None
                 ) -> None:
        self.attach = attach
        self.limits = limits
        self.pcpus = pcpus
        self.emulator_policy = emulator_policy
        self.log = log
        self.cgroups = cgroups
        self.granter = granter
        self.vms: dict[str, VmEntry] = {}
        self.budgets: dict[ThreadKey, Budget] = {}
        self.held: frozenset[ThreadKey] = frozenset()
        self.last: Arbitration | None = None
        self._said: set[str] = set()  # scan errors already logged

    # --- VMs coming and going -----------------------------------------------------------

    def update(self, found: Mapping[str, VmDescription], errors: tuple[str, ...] = ()) -> None:
        """Make the set of VMs what the scans found."""
        for line in errors:
            if line not in self._said:
                self.log(line, WARNING)
        self._said = set(errors)
        for name in [n for n in self.vms if n in found and found[n] != self.vms[n].desc]:
            self._follow_hotplug(self.vms[name], found[name])
        for name in [n for n in self.vms if n not in found or found[n] != self.vms[n].desc]:
            self.release(name, "changed" if name in found else "gone")
        for name, desc in found.items():
            entry = self.vms.get(name)
            if entry is None:
                self.vms[name] = entry = VmEntry(desc, emulator=self.emulator_policy(desc.accel))
                self._attach(entry)
            elif entry.peer is None and desc.served:
                self._attach(entry)  # attaching failed before: QEMU may be ready now

    def _follow_hotplug(self, entry: VmEntry, new: VmDescription) -> None:
        """A served VM whose only change is more vCPU threads (a hot-plug): its peer takes
        them on in place, and nothing applied to its other threads is reverted."""
        peer = entry.peer
        if peer is None or replace(entry.desc, vcpus=(), pid=None) != replace(
                new, vcpus=(), pid=None) or new.pid not in (None, peer.applier.pid):
            return  # anything else: released and attached again
        known = {v: t for v, t in peer.applier.tids().items() if v >= 0}
        now = new.vcpu_tids()
        if not now or any(now.get(v, t) != t for v, t in known.items()):
            return  # a thread replaced: QEMU restarted, or so it seems
        added = {v: t for v, t in now.items() if v not in peer.applier.originals}
        try:
            peer.applier.add(checked_threads(peer.applier.pid, added) if added else ())
        except GuestagentError as err:
            self.log(f"{new.name}: hot-plugged vCPUs not taken on: {err}", WARNING)
            return
        entry.desc = new
        if added:
            self.log(f"{new.name}: following hot-plugged vCPU "
                     + ", ".join(f"{v}:{t}" for v, t in sorted(added.items())), NOTICE)

    def _attach(self, entry: VmEntry) -> None:
        desc = entry.desc
        if not desc.served:
            if entry.error is None:
                self.log(f"{desc.name}: no {'hints channel or shmem region'}; listed, left alone",
                         NOTICE)
                entry.error = "no hints channel or region"
            return
        try:
            entry.peer = self.attach(desc)
        except Exception as err:  # noqa: BLE001 - one VM's failure must not stop the others
            text = str(err) or type(err).__name__
            if entry.error != text:
                self.log(f"{desc.name}: cannot attach: {text}", WARNING)
            entry.error = text
            return
        entry.error = None
        threads = entry.peer.applier.tids()
        self.log(f"{desc.name}: serving over the {desc.transport()} (QEMU pid "
                 f"{entry.peer.applier.pid}, vCPUs "
                 + ", ".join(f"{v}:{t}" for v, t in sorted(threads.items()) if v >= 0)
                 + f"; emulator thread {entry.emulator})", NOTICE)

    def release(self, name: str, why: str = "gone") -> None:
        """Everything applied for this VM undone; its budgets and cgroup grants given back."""
        entry = self.vms.pop(name, None)
        if entry is None:
            return
        if entry.peer is not None:
            entry.peer.applier.restore_all()
            if entry.peer.link is not None:
                try:
                    entry.peer.link.close()
                except OSError:
                    pass
            self.log(f"{name}: {why}; its threads are restored", NOTICE)
        if self.granter is not None and entry.cgroups:
            for line in self.granter.release(name):
                self.log(line)
        self.budgets = forget_vm(self.budgets, name)
        self.held = frozenset(k for k in self.held if k.vm != name)

    def release_all(self) -> None:
        for name in list(self.vms):
            self.release(name, "stopping")
        if self.granter is not None:
            for line in self.granter.release():
                self.log(line)

    def served(self) -> list[tuple[str, VmEntry]]:
        return [(n, e) for n, e in sorted(self.vms.items()) if e.peer is not None]

    # --- one round ----------------------------------------------------------------------

    def step(self, now: float) -> float | None:
        plans: dict[str, Plan] = {}
        requests: list[BoostRequest] = []
        for name, e in self.served():
            if not e.peer.qemu_alive():
                continue
            plan = e.peer.plan_step(now)
            plans[name] = plan
            requests += boost_requests(name, plan, e.emulator, companions(e.peer))
        run_ns: dict[ThreadKey, int] = {}
        for key in {r.key for r in requests} | set(self.budgets):
            entry = self.vms.get(key.vm)
            if entry is None or entry.peer is None:
                continue
            tid = entry.peer.applier.tids().get(key.index)
            ns = schedstat_ns(entry.peer.applier.pid, tid) if tid else None
            if ns is not None:
                run_ns[key] = ns
        arb = arbitrate(requests, self.held, self.budgets, run_ns, self.pcpus, self.limits, now)
        self.last = arb
        self.budgets = dict(arb.budgets)
        self.held = frozenset(k for k, v in arb.verdicts.items() if v == Verdict.GRANTED)
        deadlines = [arb.next_deadline] if arb.next_deadline is not None else []
        for name, plan in plans.items():
            e = self.vms[name]
            verdicts = {k.index: v for k, v in arb.verdicts.items() if k.vm == name}
            for index in self._still_trapped(e):
                verdicts[index] = Verdict.RT_TRAP
            plan = withhold(plan, e.peer.vcpu_originals, verdicts)
            others: dict[int, ThreadSettings] = {}
            asked = {r.key.index: r for r in requests if r.key.vm == name}
            for index, orig in companions(e.peer).items():
                req = asked.get(index)
                others[index] = (replace(orig, policy=os.SCHED_FIFO, rt_priority=req.priority)
                                 if req is not None and verdicts.get(index) == Verdict.GRANTED
                                 else orig)
            e.verdicts = {i: v.value for i, v in verdicts.items()}
            self._grant_rt(name, e, plan, others)
            refused = dict(e.peer.applier.refused)
            deadline = e.peer.finish_step(plan, now, others)
            if deadline is not None:
                deadlines.append(deadline)
            for index, n in e.peer.applier.refused.items():
                if n > refused.get(index, 0):
                    self._note_refusal(name, e, index)
        return min(deadlines) if deadlines else None

    def _cgroup_of(self, e: VmEntry, index: int) -> str | None:
        tid = e.peer.applier.tids().get(index)
        return self.cgroups.thread_cgroup(e.peer.applier.pid, tid) if tid else None

    def _still_trapped(self, e: VmEntry) -> list[int]:
        """Threads whose cgroup refused RT and still would (an operator may fix it)."""
        if self.cgroups is None:
            return []
        for index, cg in list(e.trapped.items()):
            if trap(cg, self.cgroups.chain_runtimes(cg)) is None:
                del e.trapped[index]
        return list(e.trapped)

    def _note_refusal(self, name: str, e: VmEntry, index: int) -> None:
        """The kernel said EPERM: if the RT cgroup trap is why, say so once per VM and stop
        asking; the next round withholds that thread's RT boosts (RT_TRAP)."""
        if self.cgroups is None:
            return
        cg = self._cgroup_of(e, index)
        found = trap(cg, self.cgroups.chain_runtimes(cg)) if cg else None
        if found is None:
            return
        e.trapped[index] = cg
        if e.trap is None:
            hint = ("; set [host] rt_cgroup_budget_us to let guestagent-host grant a budget"
                    if self.granter is None else "")
            e.trap = found.describe() + hint
            self.log(f"{name}: {e.trap}", ERR)

    def _grant_rt(self, name: str, e: VmEntry, plan: Plan,
                  others: Mapping[int, ThreadSettings]) -> None:
        """With a budget to hand out: before a thread first goes RT, give its cgroup
        chain RT runtime if it has none."""
        if self.cgroups is None or self.granter is None:
            return
        applier = e.peer.applier
        wanted = {v: p.settings for v, p in plan.vcpus.items()}
        wanted.update(others)
        for index, settings in wanted.items():
            current = applier.current.get(index)
            if not settings.is_rt or current is None or current.is_rt:
                continue
            cg = self._cgroup_of(e, index)
            if cg is None or cg in e.cgroups:
                continue
            # A cgroup granted for another VM (drop-in QEMUs may share one) is shared: it
            # is given back when the last VM that needed it goes.
            if not self.granter.holds(cg) and trap(cg, self.cgroups.chain_runtimes(cg)) is None:
                continue
            why = self.granter.grant(cg, name)
            if why is None:
                e.cgroups.add(cg)
                self.log(f"{name}: granted {self.granter.per_thread} µs RT runtime per period "
                         f"to cpu cgroup {cg} and its parents", NOTICE)
            elif e.trap != why:
                e.trap = why
                self.log(f"{name}: {why}", ERR)
