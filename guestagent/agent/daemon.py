"""`guestagent run`: the agent's one event loop.

observe -> decide -> publish, and capacity -> steer, driven by one selector
over the proc connector, udev, the link to the host, the control socket and a
signal wake-up fd, plus timers. Idle means asleep in select().
"""

from __future__ import annotations

import dataclasses
import logging
import os
import selectors
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping

from guestagent import __version__
from guestagent.agent import metrics
from guestagent.agent.config import Config, first_rule, load_config
from guestagent.agent.control import ControlServer, Peer
from guestagent.agent.policy import Decision, PolicyState, decide
from guestagent.agent.report import SCHEMA_VERSION, capacity_json, flag_names, hints_json
from guestagent.agent.steer import SteerState, plan, restores
from guestagent.errors import GuestagentError
from guestagent.linux.sdnotify import Notifier
from guestagent.observe import Observer, Snapshot, ThreadIdentity
from guestagent.observe.kernel import UeventMonitor
from guestagent.protocol.model import PeerState, neutral_hints
from guestagent.transport.link import GuestLink
from guestagent.transport.select import RANK, Choice, available, open_link

RELINK_INTERVAL = 10.0  # how often to look for a better transport without a uevent
STOP_FLUSH = 0.5  # how long a stopping agent keeps trying to deliver its last words
FULL_INTERVAL = 1.0  # IRQ and CPU tables and every thread detail: re-read this often

log = logging.getLogger("guestagent")


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


def _resync(selector: selectors.BaseSelector, registered: set[int], wanted: set[int],
            what: str) -> set[int]:
    """Register the fds that appeared and unregister those that went away."""
    for fd in registered - wanted:
        selector.unregister(fd)
    for fd in wanted - registered:
        selector.register(fd, selectors.EVENT_READ, what)
    return wanted


class Agent:
    def __init__(self, config: Config, config_path: str | None,
                 clock: Callable[[], float] = time.monotonic,
                 environ: Mapping[str, str] = os.environ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.started = clock()
        self.notifier = Notifier(environ)
        self.errors: Counter[str] = Counter()
        # Snapshots that changes trigger between sweeps: half the sweep budget.
        self.observer = Observer(interest=interest_for(config),
                                 change_share=config.agent["cpu_budget_percent"] / 200.0)
        self.snapshot: Snapshot = self.observer.snapshot(self.started)
        self.nr_vcpus = max(self.snapshot.cpus.possible, default=0) + 1
        self.policy_state = PolicyState()
        self.steer_state = SteerState()
        self.decision: Decision | None = None
        self.generation = 0
        self.sweeps = 0
        self.refreshes = 0  # snapshots from scheduler-change wake-ups, without a sweep
        self.sweep_cost = 0.0
        self.interval = sweep_interval(0.0, config, False)
        self.link: GuestLink | None = None
        self.choice: Choice | None = None
        self.stopping = False
        self.reload_requested = False
        self._said: set[str] = set()
        try:
            self.control = ControlServer(config.control["socket"], config.control["group"],
                                         self.handle)
        except BaseException:
            self.observer.close()
            raise
        self.devices: UeventMonitor | None = None
        try:
            self.devices = UeventMonitor(("virtio-ports", "pci"))
        except Exception as err:  # pyudev raises assorted errors; polling covers for it
            self.note(f"device events unavailable ({err}): transports re-checked every "
                      f"{RELINK_INTERVAL:g} s")

    # -- logging ---------------------------------------------------------------

    def note(self, line: str, level: int = logging.WARNING) -> None:
        """Log a condition once, not at every sweep."""
        if line not in self._said:
            self._said.add(line)
            log.log(level, line)

    # -- the link --------------------------------------------------------------

    def relink(self, now: float) -> None:
        """Move to the best transport present; keep the current one if it is the best."""
        choices = available(self.config.transport)
        current = self.choice
        if current in choices and RANK[choices[0].kind] >= RANK[current.kind]:
            return
        for choice in choices:
            if current is not None and choice == current:
                return
            try:
                link = open_link(choice, self.nr_vcpus,
                                 self.config.agent["heartbeat_interval_ms"] / 1000.0)
            except GuestagentError as err:
                self.errors["link_open"] += 1
                self.note(f"{choice.kind} transport {choice.target} unusable: {err}")
                continue
            self.drop_link(now)
            self.link, self.choice = link, choice
            log.info("transport: %s %s", choice.kind, choice.target)
            link.set_state(PeerState.RUNNING, now)
            if self.decision is not None:
                link.publish(self.decision.hints, self.generation, now)
            return
        if current is None:
            self.note(f"no transport available (mode {self.config.transport['mode']})",
                      logging.ERROR)

    def drop_link(self, now: float) -> None:
        if self.link is None:
            return
        try:
            self.link.set_state(PeerState.STOPPING, now)
            self.link.tick(now)
        finally:
            self.link.close()
            self.link, self.choice = None, None

    # -- observe, decide, publish, steer -----------------------------------------

    def sweep(self, now: float, full: bool = True) -> None:
        # CPU time, not wall time: the budget is a share of one CPU, and on a busy
        # guest the wall time of a sweep includes waiting for a CPU, which would
        # stretch the interval (and detection latency) for no saving.
        started = time.thread_time()
        self.snapshot = self.observer.snapshot(now, full=full)
        self.sweep_cost = time.thread_time() - started
        self.sweeps += 1
        # The observer's smoothed cost, so that one slow sweep (a burst of new
        # processes, a busy host) does not stall detection for long.
        self.interval = sweep_interval(self.observer.cost, self.config,
                                       self.observer.changes_watched)
        self.act(now)

    def refresh(self, now: float) -> None:
        """Act on threads whose scheduling was just set, without a sweep."""
        snapshot = self.observer.refresh(now)
        if snapshot is not None:
            self.snapshot = snapshot
            self.refreshes += 1
            self.act(now)

    def act(self, now: float) -> None:
        """Decide, publish and steer from the current snapshot."""
        for line in self.snapshot.notes:
            self.note(line)
        nr = max(self.snapshot.cpus.possible, default=0) + 1
        if nr != self.nr_vcpus:  # possible CPUs do not change at run time; be safe anyway
            self.nr_vcpus, self.policy_state = nr, PolicyState()
            self.drop_link(now)
            self.relink(now)
        decision, self.policy_state = decide(self.snapshot, self.config, self.policy_state, now)
        first = self.decision is None
        self.decision = decision
        if decision.changed or first:
            self.generation += 1
            if self.link is not None:
                self.link.publish(decision.hints, self.generation, now)
            log.debug("hints generation %d: %s", self.generation, decision.hints)
        self.steer(now)

    def steer(self, now: float) -> None:
        if not (self.config.steering["enabled"] or self.steer_state.steered):
            return
        view = self.link.view() if self.link else None
        caps = ({c.vcpu: c.capacity for c in view.capacity}
                if view is not None and view.capacity is not None else None)
        moves, self.steer_state = plan(self.snapshot, self.config, caps, self.steer_state, now)
        dry = self.config.steering["dry_run"]
        for move in moves:
            cpus = ",".join(map(str, sorted(move.affinity)))
            log.info("%ssteer %s[%d] to CPUs %s: %s", "would " if dry else "", move.comm,
                     move.tid, cpus, move.reason)
            if not dry:
                self.set_affinity(move.tid, move.affinity)

    def set_affinity(self, tid: int, cpus: frozenset[int]) -> None:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass  # the task ended: nothing to steer or restore
        except OSError as err:
            self.errors["steer"] += 1
            self.note(f"cannot set the affinity of task {tid}: {err.strerror}")

    # -- control socket --------------------------------------------------------

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
            view = self.link.view() if self.link else None
            return {"ok": True, **capacity_json(view.capacity if view else None,
                                                view.capacity_age if view else None)}
        if cmd == "reload":
            error = self.reload(now)
            return {"ok": error is None, "error": error} if error else {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def status(self, now: float) -> dict:
        view = self.link.view() if self.link else None
        transport: dict = {"kind": self.choice.kind if self.choice else None,
                           "target": self.choice.target if self.choice else None,
                           "link": view.link if view else "down"}
        if view is not None:
            transport.update(
                host_state=view.host_state.name.lower(),
                features=flag_names(view.features, type(view.features)),
                acked_generation=view.acked_generation,
                host_heard_s=None if view.last_heard is None else round(now - view.last_heard, 3),
                reason=view.reason,
                errors={k: v for k, v in dataclasses.asdict(view.errors).items() if v})
        return {
            "schema_version": SCHEMA_VERSION, "version": __version__, "pid": os.getpid(),
            "uptime_s": round(now - self.started, 3), "config": self.config.source,
            "transport": transport, "generation": self.generation,
            "nr_vcpus": self.nr_vcpus, "threads": self.snapshot.nr_threads,
            "threads_of_note": len(self.snapshot.threads),
            "thread_events": self.observer.thread_mode,
            "sched_events": self.observer.changes_watched, "sweeps": self.sweeps,
            "refreshes": self.refreshes,
            "sweep_ms": round(self.sweep_cost * 1000, 3),
            "sweep_interval_ms": round(self.interval * 1000, 1),
            "steered_tasks": len(self.steer_state.steered),
            "errors": dict(self.errors), "notes": sorted(self._said),
        }

    def reload(self, now: float) -> str | None:
        """Re-read the config; an invalid one is reported and the old one kept."""
        if self.config_path is None:
            return "running on built-in defaults: nothing to reload"
        try:
            config = load_config(self.config_path)
        except GuestagentError as err:
            self.errors["config"] += 1
            log.error("config not reloaded, keeping the old one: %s", err)
            return str(err)
        old = self.config
        self.config = config
        self.observer.set_interest(interest_for(config))
        self.observer.change_share = config.agent["cpu_budget_percent"] / 200.0
        logging.getLogger().setLevel(config.agent["log_level"].upper())
        if config.control != old.control:
            log.warning("control socket settings change at the next restart")
        if config.transport != old.transport or config.agent != old.agent:
            self.drop_link(now)
        self.relink(now)  # also a prompt look for transports that appeared
        log.info("config reloaded from %s", self.config_path)
        return None

    # -- the loop --------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        selector = selectors.DefaultSelector()
        try:
            return self._loop(selector, wake_r)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
            selector.close()
            wake_r.close()
            wake_w.close()
            self.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stopping = True

    def _loop(self, selector: selectors.BaseSelector, wake: socket.socket) -> int:
        now = self.clock()
        self.relink(now)
        self.sweep(now)
        fixed = {wake.fileno(): "wake", self.control.fileno(): "control"}
        if self.devices is not None:
            fixed[self.devices.fileno()] = "devices"
        for fd, what in fixed.items():
            selector.register(fd, selectors.EVENT_READ, what)
        observer_fds: set[int] = set()
        link_fd: int | None = None
        next_sweep = now + self.interval
        next_full = now + FULL_INTERVAL
        next_relink = now + RELINK_INTERVAL
        next_metrics = now
        next_watchdog = now
        self.notifier.ready(self.status_line())
        log.info("guestagent %s running: %d vCPUs, %d threads", __version__, self.nr_vcpus,
                 self.snapshot.nr_threads)
        while not self.stopping:
            now = self.clock()
            fd = self.link.fileno() if self.link else None
            if fd != link_fd:
                if link_fd is not None:
                    selector.unregister(link_fd)
                if fd is not None:
                    selector.register(fd, selectors.EVENT_READ, "link")
                link_fd = fd
            observer_fds = _resync(selector, observer_fds, set(self.observer.fds()), "observer")
            link_due = self.link.tick(now) if self.link else None
            deadlines = [next_sweep, next_relink, link_due, self.observer.deadline()]
            if self.config.metrics["textfile_dir"]:
                deadlines.append(next_metrics)
            if self.notifier.watchdog_interval:
                deadlines.append(next_watchdog)
            timeout = max(0.0, min(d for d in deadlines if d is not None) - now)
            for key, _ in selector.select(timeout):
                self._dispatch(key.data, key.fd)
            now = self.clock()
            self.refresh(now)
            if self.reload_requested:
                self.reload_requested = False
                self.reload(now)
            due = self.observer.deadline()
            # a young thread turned real-time, or some thread's scheduling was just
            # set: sweep at once, not at next_sweep
            changed = due is not None and now >= due and self.observer.check_changes(now)
            if changed or now >= next_sweep:
                full = now >= next_full
                self.sweep(now, full=full)
                next_sweep = now + self.interval
                if full:
                    next_full = now + FULL_INTERVAL
            if now >= next_relink:
                self.relink(now)
                next_relink = now + RELINK_INTERVAL
            if self.notifier.watchdog_interval and now >= next_watchdog:
                self.notifier.watchdog()
                self.notifier.status(self.status_line())
                next_watchdog = now + self.notifier.watchdog_interval
            if self.config.metrics["textfile_dir"] and now >= next_metrics:
                self.write_metrics()
                next_metrics = now + self.config.metrics["interval_ms"] / 1000.0
        self.shutdown(self.clock())
        return 0

    def _dispatch(self, what: str, fd: int) -> None:
        now = self.clock()
        if what == "wake":
            try:
                while os.read(fd, 512):
                    pass
            except BlockingIOError:
                pass
        elif what == "control":
            self.control.on_readable()
        elif what == "observer":
            self.observer.handle_readable(fd)
        elif what == "link" and self.link is not None:
            self.link.on_readable(now)
        elif what == "devices" and self.devices is not None:
            if self.devices.drain():
                self.relink(now)

    def status_line(self) -> str:
        kind = self.choice.kind if self.choice else "no transport"
        link = self.link.view().link if self.link else "down"
        boosted = sum(1 for h in (self.decision.hints if self.decision else ())
                      if h.request.name == "BOOST")
        return f"{kind} link {link}; {boosted} of {self.nr_vcpus} vCPUs boosted"

    def write_metrics(self) -> None:
        view = self.link.view() if self.link else None
        text = metrics.render(
            self.decision.hints if self.decision else (),
            view.capacity if view else None, self.sweep_cost, self.sweeps,
            self.choice.kind if self.choice else "none", view.link if view else "down",
            self.errors, self.generation)
        try:
            metrics.write_atomically(self.config.metrics["textfile_dir"], text)
        except OSError as err:
            self.errors["metrics"] += 1
            self.note(f"cannot write metrics to {self.config.metrics['textfile_dir']}: "
                      f"{err.strerror}")

    def shutdown(self, now: float) -> None:
        """Neutral hints and the stopping state reach the host; steered tasks go back."""
        self.notifier.stopping("stopping: publishing neutral hints")
        for tid, cpus in restores(self.steer_state):
            self.set_affinity(tid, cpus)
        self.steer_state = SteerState()
        if self.link is not None:
            self.generation += 1
            self.link.publish(neutral_hints(self.nr_vcpus), self.generation, now)
            self.link.set_state(PeerState.STOPPING, now)
            deadline = now + STOP_FLUSH
            while True:  # a channel may need a few rounds to drain its last lines
                due = self.link.tick(now)
                if due is None or now >= deadline or due > deadline:
                    break
                time.sleep(min(0.05, max(0.0, due - now)))
                now = self.clock()
        log.info("stopped: neutral hints published")

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
        self.control.close()
        self.observer.close()
