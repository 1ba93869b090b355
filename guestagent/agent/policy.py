"""The hint policy: snapshot + config + time -> one VcpuHint per vCPU.

Pure functions only: no IO, no clock (``now`` is an argument), so hysteresis
is tested over simulated time. See docs/policy.md for the rules in prose.

Two stages:
- ``wanted_hints``: what each vCPU's work needs right now, with reasons.
- ``decide``: what to publish, given what was published before: a stronger
  boost goes out at once; anything weaker waits for the hold time, and every
  change is rate-limited per vCPU.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from guestagent.agent.config import Config, first_rule
from guestagent.protocol.model import (
    RT_PRIORITY_MAX,
    HintFlag,
    Request,
    SchedClass,
    VcpuHint,
)

RT_CLASSES = (SchedClass.FIFO, SchedClass.RR, SchedClass.DEADLINE)
CRITICAL_GROUP = 1  # the co-location group of vCPUs carrying critical work
# A vCPU counts as running only low-priority work when at least this share of
# its busy time went to niced, SCHED_BATCH or SCHED_IDLE work...
LOWPRIO_SHARE = 0.9
# ...and as idle when it was busy less than this share of the interval.
IDLE_BUSY = 0.02


@dataclass(frozen=True)
class Need:
    """One piece of work that needs a vCPU served at some priority."""

    vcpu: int
    sched_class: SchedClass
    rt_priority: int
    nice: int
    flags: HintFlag
    reason: str


@dataclass(frozen=True)
class Wanted:
    """What one vCPU's work needs right now, and why."""

    hint: VcpuHint
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class VcpuTrack:
    """Per-vCPU memory between decisions."""

    published: VcpuHint
    reasons: tuple[str, ...]
    changed_at: float  # when `published` last changed
    weaker_since: float | None = None  # since when the need has been below `published`


@dataclass(frozen=True)
class PolicyState:
    tracks: Mapping[int, VcpuTrack] = field(default_factory=dict)


@dataclass(frozen=True)
class VcpuDecision:
    hint: VcpuHint  # what to publish
    reasons: tuple[str, ...]
    wanted: VcpuHint  # what the work needs right now
    held_until: float | None  # a weaker hint waits until then; None when not held


@dataclass(frozen=True)
class Decision:
    vcpus: tuple[VcpuDecision, ...]
    changed: bool  # some published hint differs from the previous decision

    @property
    def hints(self) -> tuple[VcpuHint, ...]:
        return tuple(v.hint for v in self.vcpus)


# -- what the work needs -----------------------------------------------------


def strength(hint: VcpuHint) -> tuple[int, int]:
    """Total order of how much a hint asks for: unboost < neutral < nice < RT < DEADLINE."""
    if hint.request is Request.UNBOOST:
        return (0, 0)
    if hint.request is Request.NEUTRAL:
        return (1, 0)
    if hint.sched_class is SchedClass.DEADLINE:
        return (4, hint.rt_priority)
    if hint.sched_class in RT_CLASSES:
        return (3, hint.rt_priority)
    return (2, -hint.nice)


def boost_strength(cls: SchedClass, rt_priority: int, nice: int) -> tuple[int, int]:
    """How much a boost to this class, priority or nice asks for (see ``strength``)."""
    return strength(VcpuHint(vcpu=0, request=Request.BOOST, sched_class=cls,
                             rt_priority=rt_priority, nice=nice))


def _need_strength(need: Need) -> tuple[int, int]:
    return boost_strength(need.sched_class, need.rt_priority, need.nice)


def _placement(thread, online: frozenset[int], floating: str) -> tuple[tuple[int, ...], bool]:
    """The vCPUs a thread's need lands on, and whether it is pinned to exactly one."""
    allowed = thread.affinity & online
    if len(allowed) == 1:
        return tuple(allowed), True
    if floating == "all":
        return tuple(sorted(allowed)), False
    if floating == "last_cpu" and thread.last_cpu in allowed:
        return (thread.last_cpu,), False
    return (), False


def _describe(thread) -> str:
    return f"{thread.comm}[{thread.tid}]"


def thread_needs(snapshot, config: Config) -> list[Need]:
    """Needs from RT/DEADLINE threads and from tasks that rules mark latency-sensitive.

    Kernel threads are skipped: per-CPU housekeeping kthreads (migration/N at
    FIFO 99, for one) sit pinned on every vCPU and say nothing about the
    workload. Threaded IRQ handlers are counted through their IRQ instead.
    """
    online = snapshot.cpus.online
    floating = config.policy["floating_rt"]
    needs: list[Need] = []
    for thread in snapshot.threads:
        if thread.is_kthread:
            continue
        rule = first_rule(config.rules, thread)
        if rule is not None:
            cls, prio, nice = rule.sched_class, rule.priority, rule.nice
            if cls is SchedClass.DEADLINE:
                prio = RT_PRIORITY_MAX  # as for DEADLINE threads: above every RT task
            if thread.policy in RT_CLASSES and boost_strength(
                    thread.policy, _rt_prio(thread), 0) > boost_strength(cls, prio, nice):
                cls, prio = thread.policy, _rt_prio(thread)
            flags = HintFlag.LATENCY_SLEEPER if rule.sleeper else HintFlag.NONE
            label = f"rule {rule.name}: {_describe(thread)}"
        elif thread.policy in RT_CLASSES:
            cls, prio, nice = thread.policy, _rt_prio(thread), 0
            flags = HintFlag.NONE
            label = f"{cls.name.lower()} {prio}: {_describe(thread)}"
        else:
            continue
        if cls not in RT_CLASSES:
            prio = 0
        vcpus, pinned = _placement(thread, online, floating)
        for vcpu in vcpus:
            need_flags = flags | (HintFlag.PINNED_CRITICAL if pinned and cls in RT_CLASSES
                                  else HintFlag.NONE)
            where = "pinned" if pinned else "floating"
            needs.append(Need(vcpu, cls, prio, nice, need_flags, f"{label} ({where})"))
    return needs


def _rt_prio(thread) -> int:
    # DEADLINE tasks preempt every RT task in the guest: ask for the top.
    return RT_PRIORITY_MAX if thread.policy is SchedClass.DEADLINE else thread.rt_priority


def irq_is_critical(irq, config: Config) -> str | None:
    """Why an IRQ is critical under the config, or None."""
    policy = config.policy
    for pattern in policy["critical_irqs"]:
        for action in irq.actions:
            if fnmatch.fnmatchcase(action, pattern):
                return f"irq {irq.irq} {action} matches {pattern!r}"
    for dev in irq.netdevs:
        if dev in policy["critical_netdevs"]:
            return f"irq {irq.irq} serves {dev}"
    threshold = policy["critical_irq_rate"]
    if threshold and irq.rate > threshold:
        return f"irq {irq.irq} at {irq.rate:.0f}/s > {threshold}/s"
    return None


def irq_needs(snapshot, config: Config) -> list[Need]:
    """Needs from threaded IRQs and critical IRQs, by effective affinity."""
    online = snapshot.cpus.online
    needs: list[Need] = []
    for irq in snapshot.irqs:
        cpus = irq.effective_affinity & online
        pinned = len(cpus) == 1
        why = irq_is_critical(irq, config)
        if why and pinned:
            (vcpu,) = cpus
            needs.append(Need(vcpu, SchedClass.OTHER, 0, 0, HintFlag.CRITICAL_IRQ,
                              f"critical: {why}"))
        if not (config.policy["threaded_irqs"] and pinned and irq.rate > 0):
            continue
        (vcpu,) = cpus
        for thread in irq.threads:
            if thread.policy in RT_CLASSES:
                needs.append(Need(vcpu, thread.policy, _rt_prio(thread), 0,
                                  HintFlag.CRITICAL_IRQ if why else HintFlag.NONE,
                                  f"irq thread {_describe(thread)} "
                                  f"{thread.policy.name.lower()} {_rt_prio(thread)}, "
                                  f"{irq.rate:.0f}/s"))
    return needs


def _lowprio_threads(snapshot) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for thread in snapshot.threads:
        if thread.is_lowprio:
            out.setdefault(thread.last_cpu, []).append(_describe(thread))
    return out


def wanted_hints(snapshot, config: Config) -> dict[int, Wanted]:
    """What every vCPU needs right now. vCPUs are 0..max(possible)."""
    nr_vcpus = max(snapshot.cpus.possible, default=0) + 1
    needs = thread_needs(snapshot, config) + irq_needs(snapshot, config)
    by_vcpu: dict[int, list[Need]] = {}
    for need in needs:
        if 0 <= need.vcpu < nr_vcpus:
            by_vcpu.setdefault(need.vcpu, []).append(need)
    critical = sorted(v for v, ns in by_vcpu.items()
                      if any(n.flags & (HintFlag.CRITICAL_IRQ | HintFlag.PINNED_CRITICAL)
                             for n in ns))
    group = CRITICAL_GROUP if len(critical) >= 2 else 0
    lowprio = _lowprio_threads(snapshot)
    out: dict[int, Wanted] = {}
    for vcpu in range(nr_vcpus):
        vneeds = by_vcpu.get(vcpu, [])
        flags = HintFlag.NONE
        for need in vneeds:
            flags |= need.flags
        hint = VcpuHint(vcpu=vcpu, flags=flags, group=group if vcpu in critical else 0)
        reasons = tuple(n.reason for n in vneeds)
        boosts = [n for n in vneeds if n.sched_class in RT_CLASSES or n.nice < 0]
        if boosts:
            top = max(boosts, key=_need_strength)
            hint = replace(hint, request=Request.BOOST, sched_class=top.sched_class,
                           rt_priority=top.rt_priority, nice=top.nice)
        elif not vneeds and vcpu in snapshot.cpus.online:
            hint, reasons = _maybe_unboost(hint, snapshot, config, lowprio.get(vcpu, []))
        out[vcpu] = Wanted(hint, reasons)
    return out


def _maybe_unboost(hint: VcpuHint, snapshot, config: Config,
                   lowprio: list[str]) -> tuple[VcpuHint, tuple[str, ...]]:
    """Unboost a vCPU whose busy time went (almost) all to low-priority work."""
    busy = snapshot.cpus.busy.get(hint.vcpu)
    low = snapshot.cpus.lowprio.get(hint.vcpu, 0.0)
    if busy is None:  # no usage figures yet (first sweep)
        return hint, ()
    if busy < IDLE_BUSY:
        hint = replace(hint, flags=hint.flags | HintFlag.IDLE)
        if config.policy["unboost_idle"]:
            return replace(hint, request=Request.UNBOOST), (f"idle ({busy:.0%} busy)",)
        return hint, (f"idle ({busy:.0%} busy)",)
    if config.policy["unboost"] and low >= LOWPRIO_SHARE * busy:
        who = ", ".join(lowprio[:3]) + (" …" if len(lowprio) > 3 else "")
        text = f"only low-priority work ({low:.0%} of {busy:.0%} busy)"
        return (replace(hint, request=Request.UNBOOST, sched_class=SchedClass.OTHER, nice=0),
                (text + (f": {who}" if who else ""),))
    return hint, ()


# -- hysteresis --------------------------------------------------------------


def decide(snapshot, config: Config, state: PolicyState,
           now: float) -> tuple[Decision, PolicyState]:
    """The hints to publish now, and the state to pass to the next call."""
    hold = config.policy["hold_time_ms"] / 1000.0
    gap = config.policy["min_change_interval_ms"] / 1000.0
    decisions: list[VcpuDecision] = []
    tracks: dict[int, VcpuTrack] = {}
    changed = False
    for vcpu, wanted in sorted(wanted_hints(snapshot, config).items()):
        previous = state.tracks.get(vcpu)
        decision, tracks[vcpu] = step(previous, wanted, now, hold, gap)
        changed = changed or previous is None or previous.published != decision.hint
        decisions.append(decision)
    changed = changed or set(state.tracks) != set(tracks)
    return Decision(tuple(decisions), changed), PolicyState(tracks)


def step(track: VcpuTrack | None, wanted: Wanted, now: float, hold: float,
         gap: float) -> tuple[VcpuDecision, VcpuTrack]:
    """One vCPU's hysteresis: boost at once, weaken only after `hold`, rate-limit by `gap`."""
    if track is None:
        track = VcpuTrack(wanted.hint, wanted.reasons, now)
        return VcpuDecision(wanted.hint, wanted.reasons, wanted.hint, None), track
    published, want = track.published, wanted.hint
    if want == published:
        track = replace(track, reasons=wanted.reasons, weaker_since=None)
        return VcpuDecision(published, wanted.reasons, want, None), track
    if strength(want) > strength(published):
        track = VcpuTrack(want, wanted.reasons, now)
        return VcpuDecision(want, wanted.reasons, want, None), track
    weaker_since = track.weaker_since if track.weaker_since is not None else now
    if strength(want) == strength(published):
        ready_at = track.changed_at + gap  # flags or group changed: only rate-limited
    else:
        ready_at = max(weaker_since + hold, track.changed_at + gap)
    if now >= ready_at:
        track = VcpuTrack(want, wanted.reasons, now)
        return VcpuDecision(want, wanted.reasons, want, None), track
    track = replace(track, weaker_since=weaker_since)
    held = track.reasons + (f"held until the hold time ends; now needs: "
                            f"{'; '.join(wanted.reasons) or 'nothing'}",)
    return VcpuDecision(published, held, want, ready_at), track
