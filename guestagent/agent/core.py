"""The agent's core: observe -> decide -> publish -> steer, one step at a time.

``AgentCore`` owns no fd, signal or socket of its own: it is given its
observer, its uplink (the link to the host), its clock and its log, and the
daemon (``daemon.py``) wires the real ones and runs the loop. Each ``step(now)``
does what is due at ``now`` and returns the named deadlines of the next one,
so tests drive it in-process, tick by tick, on a fake clock.

What makes a step decide again: a sweep; a snapshot re-read for threads whose
scheduling was just set, young threads that turned real-time, or threads that
mattered and exited (the observer's ``refresh``); and the end of a hold, so a
downgrade goes out when the hold ends, not at the next sweep.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping

from guestagent import __version__
from guestagent.agent.config import DEFAULT_PATH, Config, first_rule, load_config
from guestagent.agent.control import Peer
from guestagent.agent.policy import Decision, PolicyState, decide
from guestagent.agent.report import (
    SCHEMA_VERSION,
    capacity_json,
    describe_need,
    flag_names,
    hint_json,
    hints_json,
)
from guestagent.agent.steer import SteerState, own_cpus, plan, restores
from guestagent.agent.uplink import Uplink
from guestagent.errors import GuestagentError
from guestagent.linux.procfs import format_cpulist
from guestagent.observe import Observer, Snapshot, ThreadIdentity
from guestagent.protocol.model import PeerState, VcpuHint, neutral_hints

RELINK_INTERVAL = 10.0  # how often to look for a better transport without a uevent
FULL_INTERVAL = 1.0  # IRQ and CPU tables and every thread detail: re-read this often

SetAffinity = Callable[[int, "frozenset[int]"], None]


def interest_for(config: Config) -> Callable[[ThreadIdentity], bool] | None:
    """Threads that rules name matter even at SCHED_OTHER and nice 0."""
    rules = config.rules
    if not rules:
        return None
    return lambda ident: first_rule(rules, ident) is not None


def sweep_interval(cost: float, config: Config, watched: bool) -> float:
    """Space sweeps so that they stay within the configured share of one CPU.

    With scheduler-change wake-ups the periodic sweep is a backstop (cpuset
    changes, priority inheritance): it gets half the budget and the sweeps
    that changes trigger get the other half.
    """
    floor = config.agent["sweep_interval_ms"] / 1000.0
    budget = config.agent["cpu_budget_percent"] / 100.0
    return max(floor, cost / (budget / 2 if watched else budget))


def change_share(config: Config) -> float:
    """Snapshots that changes trigger between sweeps: half the sweep budget."""
    return config.agent["cpu_budget_percent"] / 200.0


def describe_hints(hints: tuple[VcpuHint, ...]) -> str:
    """One line for a log: 'vCPU 0 neutral, vCPU 1 boost fifo 30 [pinned_critical]'."""
    parts = []
    for hint in hints:
        doc = hint_json(hint)
        flags = f" [{','.join(doc['flags'])}]" if doc["flags"] else ""
        group = f" group {hint.group}" if hint.group else ""
        parts.append(f"vCPU {hint.vcpu} {describe_need(doc)}{flags}{group}")
    return ", ".join(parts)


class Notes:
    """Conditions logged once, not at every sweep; the status shows them."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.said: set[str] = set()

    def __call__(self, line: str, level: int = logging.WARNING) -> None:
        if line not in self.said:
            self.said.add(line)
            self.log.log(level, line)


class AgentCore:
    """One guest's observe -> decide -> publish -> steer, over injected parts."""

    def __init__(self, config: Config, observer: Observer, uplink: Uplink, notes: Notes,
                 clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger | None = None, config_path: str | None = None,
                 default_path: str = DEFAULT_PATH,
                 set_affinity: SetAffinity = os.sched_setaffinity) -> None:
        self.config = config
        self.config_path = config_path
        self.default_path = default_path  # where a config may appear later (SIGHUP)
        self.observer = observer
        self.uplink = uplink
        self.note = notes
        self.clock = clock
        self.log = log if log is not None else logging.getLogger("guestagent")
        self.set_affinity_call = set_affinity
        self.errors: Counter[str] = uplink.errors
        self.wakeups: Mapping[str, int] = {}  # the loop's wake-ups by source, for status
        self.started = clock()
        self.snapshot: Snapshot = observer.snapshot(self.started)
        self._note_all(self.snapshot.notes)
        self.nr_vcpus = self.snapshot.cpus.nr_vcpus
        self.policy_state = PolicyState()
        self.steer_state = SteerState()
        self.own_original = frozenset(os.sched_getaffinity(0))  # the agent's, at start
        self.own_applied = self.own_original
        self.decision: Decision | None = None
        self.generation = 0
        self.sweeps = 0
        self.refreshes = 0  # snapshots from wake-ups that re-read a few threads, no sweep
        self.interval = sweep_interval(0.0, config, False)
        self.unpublished = False  # a decision the link has not been given yet
        self.reload_requested = False
        self.relink_requested = False
        self.next_sweep = self.started  # the first step sweeps
        self.next_full = self.started
        self.next_relink = self.started
        self.hold_until: float | None = None
        self.link_due: float | None = None

    # -- the cycle -------------------------------------------------------------

    def step(self, now: float) -> dict[str, float | None]:
        """Do what is due at ``now``; returns the next deadline of each timer."""
        if self.reload_requested:
            self.reload_requested = False
            self.reload(now)
        if self.relink_requested or now >= self.next_relink:
            self.relink_requested = False
            self.relink(now)
        if self.observe(now) or (self.hold_until is not None and now >= self.hold_until):
            self.decide(now)
            self.publish(now)
            self.place_self()
            self.steer(now)
        else:
            self.publish(now)
        return self.timers()

    def timers(self) -> dict[str, float | None]:
        return {"sweep": self.next_sweep, "relink": self.next_relink, "link": self.link_due,
                "observer": self.observer.deadline(), "hold": self.hold_until}

    def observe(self, now: float) -> bool:
        """A new snapshot when one is due: a sweep, or the few threads that changed."""
        due = self.observer.deadline()
        # some change could not be pinned to threads (or the young re-checks are due)
        changed = due is not None and now >= due and self.observer.check_changes(now)
        if changed or now >= self.next_sweep:
            full = now >= self.next_full
            self.snapshot = self.observer.snapshot(now, full=full)
            self.sweeps += 1
            # The observer's smoothed cost, so that one slow sweep (a burst of new
            # processes, a busy host) does not stall detection for long.
            self.interval = sweep_interval(self.observer.cost, self.config,
                                           self.observer.changes_watched)
            self.next_sweep = now + self.interval
            if full:
                self.next_full = now + FULL_INTERVAL
            return True
        snapshot = self.observer.refresh(now)
        if snapshot is None:
            return False
        self.snapshot = snapshot
        self.refreshes += 1
        return True

    def decide(self, now: float) -> None:
        self._note_all(self.snapshot.notes)
        nr = self.snapshot.cpus.nr_vcpus
        if nr != self.nr_vcpus:  # possible CPUs do not change at run time; be safe anyway
            self.nr_vcpus, self.policy_state = nr, PolicyState()
            self.uplink.drop(now)
            self.relink(now)
        decision, self.policy_state = decide(self.snapshot, self.config, self.policy_state, now)
        first = self.decision is None
        self.decision = decision
        held = [v.held_until for v in decision.vcpus
                if v.held_until is not None and v.held_until > now]
        self.hold_until = min(held, default=None)
        if decision.changed or first:
            self.generation += 1
            self.unpublished = True
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("hints generation %d: %s", self.generation,
                               describe_hints(decision.hints))

    def publish(self, now: float) -> None:
        link = self.uplink.link
        if link is None:
            self.link_due = None
            return
        if self.unpublished and self.decision is not None:
            link.publish(self.decision.hints, self.generation, now)
        self.unpublished = False
        self.link_due = link.tick(now)

    def steer(self, now: float) -> None:
        if not (self.config.steering["enabled"] or self.steer_state.steered):
            return
        view = self.uplink.view()
        caps = ({c.vcpu: c.capacity for c in view.capacity}
                if view is not None and view.capacity is not None else None)
        moves, self.steer_state = plan(self.snapshot, self.config, caps, self.steer_state, now)
        dry = self.config.steering["dry_run"]
        for move in moves:
            cpus = ",".join(map(str, sorted(move.affinity)))
            self.log.info("%ssteer %s[%d] to CPUs %s: %s", "would " if dry else "", move.comm,
                          move.tid, cpus, move.reason)
            if not dry:
                self.set_affinity(move.tid, move.affinity)

    def place_self(self) -> None:
        """Keep the agent's threads off the vCPUs it unboosts (steer.own_cpus says why)."""
        if self.decision is None:
            return
        want = own_cpus(self.own_original, self.decision.hints, self.snapshot.cpus.online)
        if want == self.own_applied:
            return
        self.log.info("agent runs on CPUs %s: off the vCPUs it unboosts", format_cpulist(want))
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError as err:
            self.note(f"cannot list the agent's own threads: {err.strerror}")
            return
        for tid in tids:
            self.set_affinity(tid, want)
        self.own_applied = want

    def set_affinity(self, tid: int, cpus: frozenset[int]) -> None:
        try:
            self.set_affinity_call(tid, cpus)
        except ProcessLookupError:
            pass  # the task ended: nothing to steer or restore
        except OSError as err:
            self.errors["steer"] += 1
            self.note(f"cannot set the affinity of task {tid}: {err.strerror}")

    def _note_all(self, lines: tuple[str, ...]) -> None:
        for line in lines:
            self.note(line)

    # -- the link --------------------------------------------------------------

    def relink(self, now: float) -> None:
        """Move to the best transport present; a new link gets the current hints."""
        self.next_relink = now + RELINK_INTERVAL
        heartbeat = self.config.agent["heartbeat_interval_ms"] / 1000.0
        if self.uplink.relink(self.config.transport, self.nr_vcpus, heartbeat, now):
            self.unpublished = self.decision is not None
            self.publish(now)

    # -- control requests ------------------------------------------------------

    def handle(self, request: dict, peer: Peer) -> dict:
        cmd, now = request["cmd"], self.clock()
        if cmd == "ping":
            return {"ok": True}
        if cmd == "status":
            return {"ok": True, **self.status(now)}
        if cmd == "hints":
            assert self.decision is not None
            return {"ok": True, **hints_json(self.decision, self.generation, now)}
        if cmd == "capacity":
            view = self.uplink.view()
            return {"ok": True, **capacity_json(view.capacity if view else None,
                                                view.capacity_age if view else None)}
        if cmd == "reload":
            error = self.reload(now)
            return {"ok": error is None, "error": error} if error else {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def status(self, now: float) -> dict:
        view = self.uplink.view()
        choice = self.uplink.choice
        transport: dict = {"kind": choice.kind if choice else None,
                           "target": choice.target if choice else None,
                           "link": view.link if view else "down"}
        if view is not None:
            transport.update(
                host_state=view.host_state.name.lower(),
                features=flag_names(view.features, type(view.features)),
                acked_generation=view.acked_generation,
                reason=view.reason,
                errors={k: v for k, v in dataclasses.asdict(view.errors).items() if v})
            # Absent for a host never heard: the link's watch starts its clock at open.
            if view.last_heard is not None and transport["host_state"] != "absent":
                transport["host_heard_s"] = round(now - view.last_heard, 3)
        return {
            "schema_version": SCHEMA_VERSION, "version": __version__, "pid": os.getpid(),
            "uptime_s": round(now - self.started, 3), "config": self.config_path,
            "transport": transport, "generation": self.generation,
            "nr_vcpus": self.nr_vcpus, "threads": self.snapshot.nr_threads,
            "threads_of_note": len(self.snapshot.threads),
            "thread_events": self.observer.thread_mode,
            "sched_events": self.observer.changes_watched, "sweeps": self.sweeps,
            "refreshes": self.refreshes,
            "sweep_ms": round(self.observer.last_cost * 1000, 3),
            "sweep_interval_ms": round(self.interval * 1000, 1),
            "steered_tasks": len(self.steer_state.steered),
            "errors": dict(self.errors), "notes": sorted(self.note.said),
            "wakeups": dict(sorted(self.wakeups.items())),
        }

    def status_line(self) -> str:
        choice, view = self.uplink.choice, self.uplink.view()
        kind = choice.kind if choice else "no transport"
        boosted = sum(1 for h in (self.decision.hints if self.decision else ())
                      if h.request.name == "BOOST")
        return (f"{kind} link {view.link if view else 'down'}; "
                f"{boosted} of {self.nr_vcpus} vCPUs boosted")

    def reload(self, now: float) -> str | None:
        """Re-read the config; an invalid one is reported and the old one kept.

        On built-in defaults, a file that has since appeared at the default path
        is read; none there is said, not ignored."""
        path = self.config_path
        if path is None:
            if not os.path.exists(self.default_path):
                line = (f"running on built-in defaults: nothing to reload "
                        f"(no {self.default_path})")
                self.log.warning("%s", line)
                return line
            path = self.default_path
        try:
            config = load_config(path)
        except GuestagentError as err:
            self.errors["config"] += 1
            self.log.error("config not reloaded, keeping the old one: %s", err)
            return str(err)
        old = self.config
        self.config, self.config_path = config, path
        self.observer.set_interest(interest_for(config))
        self.observer.change_share = change_share(config)
        logging.getLogger().setLevel(config.agent["log_level"].upper())
        if config.control != old.control:
            self.log.warning("control socket settings change at the next restart")
        if config.transport != old.transport or config.agent != old.agent:
            self.uplink.drop(now)
        self.relink(now)  # also a prompt look for transports that appeared
        self.log.info("config reloaded from %s", path)
        return None

    # -- the end ---------------------------------------------------------------

    def stop(self, now: float) -> None:
        """Steered tasks go back; neutral hints and STOPPING go to the link (the
        caller gives the link time to deliver them)."""
        for tid, cpus in restores(self.steer_state):
            self.set_affinity(tid, cpus)
        self.steer_state = SteerState()
        link = self.uplink.link
        if link is not None:
            self.generation += 1
            link.publish(neutral_hints(self.nr_vcpus), self.generation, now)
            link.set_state(PeerState.STOPPING, now)
