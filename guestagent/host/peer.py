"""The daemon loop: the link, the status socket and stop signals, on one event loop.

Each wake-up reads what the guest says, decides (pure), applies the difference,
and publishes capacity when due. Sleeping until the next deadline (lease
expiry, flood limit, capacity period, the link's own timers) means no busy loop
and a revert no later than the lease end.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Callable

from guestagent.host.applier import Log, ThreadApplier
from guestagent.host.capacity import Sample, capacities, read_sample
from guestagent.host.config import HostLimits
from guestagent.host.decide import GuestInput, Lease, Plan, decide, initial_plan
from guestagent.host.settings import ThreadSettings
from guestagent.host.status import PeerSnapshot, answer, flag_names, status_document
from guestagent.host.undo import thread_label
from guestagent.linux.loop import Loop
from guestagent.protocol.model import AppliedFlag, PeerState, VcpuCapacity, VcpuHint
from guestagent.transport import HostLink

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def guest_input(view: Any) -> tuple[GuestInput, int]:
    """The decision's input and the hint generation, from a link's view."""
    try:
        state = PeerState(int(view.guest_state))
    except (ValueError, TypeError):
        state = PeerState.ABSENT
    hints = tuple(h for h in view.hints if isinstance(h, VcpuHint))
    last = view.last_heard if isinstance(view.last_heard, (int, float)) else None
    return GuestInput(state, hints, last), int(view.generation)


class HostPeer:
    """One VM: its vCPU threads, its link, its limits."""

    def __init__(self, applier: ThreadApplier, limits: HostLimits, pin_cpus: frozenset[int],
                 link: HostLink | None, log: Log,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.applier = applier
        self.limits = limits
        self.pin_cpus = pin_cpus
        self.link = link
        self.log = log
        self.clock = clock
        self.plan: Plan = initial_plan(self.vcpu_originals)
        self.guest = GuestInput()
        self.generation = 0
        self.published: dict[int, VcpuCapacity] = {}
        self.counters: Counter[str] = Counter()
        self.clamps: Counter[int] = Counter()  # per vCPU: grants made at less than asked
        self._sample: Sample | None = None  # the newest /proc sample
        self._before: Sample | None = None  # the one a capacity period earlier
        self._acked: tuple[int, dict[int, AppliedFlag]] | None = None  # last published
        self._next_capacity = float("-inf")  # publish on the first step
        self.link_state: tuple[str, str] = ("down", "")  # (link, reason) as last logged

    def _link_call(self, what: str, func: Callable[[], Any]) -> Any:
        # The link parses untrusted bytes; whatever goes wrong there must not end the peer.
        try:
            return func()
        except Exception as err:  # noqa: BLE001 - counted and logged, never fatal
            self.counters["link_errors"] += 1
            if self.counters["link_errors"] <= 10:
                self.log(f"link {what}: {type(err).__name__}: {err}")
            return None

    @property
    def vcpu_originals(self) -> dict[int, ThreadSettings]:
        """The vCPU threads' originals: the applier may also hold the emulator thread (< 0)."""
        return {v: s for v, s in self.applier.originals.items() if v >= 0}

    def step(self, now: float) -> float | None:
        """Decide and apply; publish capacity if due. Returns the next deadline."""
        return self.finish_step(self.plan_step(now), now)

    def plan_step(self, now: float) -> Plan:
        """Read what the guest says and decide; nothing is applied yet (an arbiter may
        still withhold boosts across VMs before finish_step applies the plan)."""
        if self.link is not None:
            view = self._link_call("view", self.link.view)
            if view is not None:
                self._note_link(view)
                try:
                    self.guest, self.generation = guest_input(view)
                except (AttributeError, TypeError, ValueError) as err:
                    self.counters["bad_views"] += 1
                    self.log(f"link view unusable: {err}")
        plan = decide(self.guest, self.vcpu_originals, self.limits, self.pin_cpus,
                      self.plan, now)
        self.counters["rejected_hints"] += plan.rejected
        if plan.lease != self.plan.lease:
            self.log(f"lease {plan.lease.value}")
            if plan.lease == Lease.EXPIRED and self.plan.lease == Lease.HELD:
                self.counters["lease_expiries"] += 1
        return plan

    def finish_step(self, plan: Plan, now: float,
                    others: Mapping[int, ThreadSettings] | None = None) -> float | None:
        """Apply the plan (and `others`: settings of non-vCPU threads such as the emulator
        thread), publish capacity if due. Returns the next deadline."""
        deadlines: list[float] = []
        for vcpu, p in plan.vcpus.items():
            before = self.plan.vcpus.get(vcpu)
            if (p.applied & AppliedFlag.CLAMPED and before is not None
                    and p.settings != before.settings):
                self.clamps[vcpu] += 1
        self.plan = self._apply(plan, others or {})
        if plan.next_deadline is not None:
            deadlines.append(plan.next_deadline)
        if now >= self._next_capacity:
            self._publish(now, resample=True)
            self._next_capacity = now + self.limits.capacity_period
        elif self._acked != (self.generation, self._flags()):
            # Acknowledge a new hint table (or a changed outcome) now, not a period later.
            self._publish(now, resample=False)
        deadlines.append(self._next_capacity)
        if self.link is not None:
            nxt = self._link_call("tick", lambda: self.link.tick(now))
            if nxt is not None:
                deadlines.append(nxt)
        return min(deadlines)

    def _note_link(self, view: Any) -> None:
        """Log each change of link state, so an operator sees why nothing is applied
        (say, a region file QEMU has not created or the guest has not formatted yet)."""
        state = (str(getattr(view, "link", "")), str(getattr(view, "reason", "")))
        if state != self.link_state:
            self.link_state = state
            self.log(f"link {self.link.kind if self.link else '-'} {state[0]}"
                     + (f": {state[1]}" if state[1] else ""))

    def _apply(self, plan: Plan, others: Mapping[int, ThreadSettings]) -> Plan:
        """Apply each vCPU's settings, and the other threads' (the emulator thread,
        iothreads); a refused vCPU change is reported as DENIED. What goes down goes
        first: never more RT threads at once than the plan allows, not even for a moment."""
        vcpus = dict(plan.vcpus)
        changes = [(v, p.settings) for v, p in plan.vcpus.items()] + [
            (i, s) for i, s in others.items() if i in self.applier.originals]
        for vcpu, settings in sorted(changes, key=lambda c: c[1].is_rt):
            if vcpu in self.applier.gone or not self.applier.differs(vcpu, settings):
                continue
            got = self.applier.apply(vcpu, settings)
            if vcpu not in plan.vcpus:
                if got is not None:
                    self.log(f"{thread_label(vcpu)} thread: {got.describe()}")
                continue
            p = plan.vcpus[vcpu]
            if got is None and vcpu not in self.applier.gone:
                self.counters["apply_failures"] += 1
                flags = p.applied & ~(AppliedFlag.BOOSTED | AppliedFlag.THROTTLED
                                      | AppliedFlag.PINNED)
                vcpus[vcpu] = replace(p, settings=self.applier.current[vcpu],
                                      applied=flags | AppliedFlag.DENIED)
            elif got is not None:
                self.log(f"vCPU {vcpu}: {got.describe()} [{','.join(flag_names(p.applied))}]")
        return replace(plan, vcpus=vcpus)

    def _flags(self) -> dict[int, AppliedFlag]:
        return {v: p.applied for v, p in self.plan.vcpus.items()}

    def _publish(self, now: float, resample: bool) -> None:
        if resample or self._sample is None:
            sample = read_sample(self.applier.pid, self.applier.tids())
            self._before, self._sample = self._sample or sample, sample
        flags = self._flags()
        caps = capacities(self._before or self._sample, self._sample, flags,
                          self.limits.contend, self.generation)
        self.published = {c.vcpu: c for c in caps}
        self._acked = (self.generation, flags)
        if self.link is not None:
            self._link_call("publish", lambda: self.link.publish_capacity(caps, now))

    def snapshot(self, now: float) -> PeerSnapshot:
        if self.link is not None:  # the link may have moved on since the last step
            view = self._link_call("view", self.link.view)
            if view is not None:
                self._note_link(view)
        return PeerSnapshot(
            pid=self.applier.pid, link=self.link.kind if self.link else None,
            link_state=self.link_state[0], link_reason=self.link_state[1],
            guest_state=self.guest.state.name, generation=self.generation, plan=self.plan,
            current=dict(self.applier.current), tids=self.applier.tids(),
            published=dict(self.published), counters=dict(self.counters),
            dry_run=self.applier.dry_run, now=now)

    def qemu_alive(self) -> bool:
        return os.path.exists(f"/proc/{self.applier.pid}")

    def run(self, status: socket.socket | None) -> int:
        """Serve until a stop signal or QEMU exits; restore every thread on the way out."""
        stop: list[int] = []
        loop = Loop(self.clock)
        loop.catch(STOP_SIGNALS, stop.append)
        if status is not None:
            loop.watch("status", status.fileno(), lambda _fd: answer(
                status, status_document(self.snapshot(self.clock()))))

        def on_link(_fd: int) -> None:
            if self.link is not None:
                self._link_call("read", lambda: self.link.on_readable(self.clock()))

        try:
            while not stop:
                now = self.clock()
                # the link reconnects (or drops): follow its fd
                fd = self._link_call("fileno", self.link.fileno) if self.link else None
                loop.watch("link", fd, on_link)
                loop.at("step", self.step(now))
                if not self.qemu_alive():
                    self.log(f"QEMU (pid {self.applier.pid}) exited")
                    break
                loop.wait()
        finally:
            self.applier.restore_all()
            if self.link is not None:
                self._link_call("close", self.link.close)
            loop.close()
        if stop:
            self.log(f"stopping on {signal.Signals(stop[0]).name}; threads restored")
        return 0
