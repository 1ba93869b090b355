"""The agent's core in-process: a scripted guest link, a scripted observer, a fake clock."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace

from guestagent.agent.config import Config, parse_config
from guestagent.agent.core import AgentCore, Notes
from guestagent.agent.uplink import Uplink
from guestagent.observe import Snapshot
from guestagent.protocol.model import PeerState, VcpuHint
from guestagent.transport.link import ALL_FEATURES, GuestView, LinkErrors
from guestagent.transport.select import Choice


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedGuestLink:
    """Records what the core publishes; its link state is whatever the test sets."""

    link: str = "up"
    published: list[tuple[int, tuple[VcpuHint, ...]]] = field(default_factory=list)
    states: list[PeerState] = field(default_factory=list)
    closed: bool = False

    def fileno(self) -> int | None:
        return None

    def on_readable(self, now: float) -> None:
        pass

    def publish(self, hints, generation: int, now: float) -> None:
        self.published.append((generation, tuple(hints)))

    def set_state(self, state: PeerState, now: float) -> None:
        self.states.append(state)

    def tick(self, now: float) -> float | None:
        return None

    def view(self) -> GuestView:
        return GuestView("scripted", self.link, PeerState.RUNNING, ALL_FEATURES, None, None,
                         0, None, "", LinkErrors())

    def close(self) -> None:
        self.closed = True

    @property
    def last(self) -> tuple[VcpuHint, ...]:
        return self.published[-1][1]


class ScriptedLinks:
    """The transports 'present': one scripted choice; each open makes a new link."""

    def __init__(self) -> None:
        self.opened: list[ScriptedGuestLink] = []
        self.target = "scripted-0"

    def find(self, transport) -> list[Choice]:
        return [Choice("local", self.target)]

    def open(self, choice: Choice, nr_vcpus: int, heartbeat: float) -> ScriptedGuestLink:
        link = ScriptedGuestLink()
        self.opened.append(link)
        return link

    def reconnect(self) -> None:
        """The next relink finds another transport target, so it opens a new link."""
        self.target = f"scripted-{len(self.opened)}"


class ScriptedObserver:
    """Hands out the snapshot the test set; ``refresh`` returns one set with ``changes``."""

    thread_mode = "events"
    changes_watched = True
    change_share = 0.0025

    def __init__(self, first: Snapshot) -> None:
        self.current = first
        self.pending: Snapshot | None = None
        self.sweeps = 0
        self.cost = 0.001
        self.last_cost = 0.001

    def snapshot(self, now: float, full: bool = True) -> Snapshot:
        self.sweeps += 1
        self.pending = None
        return replace(self.current, taken_at=now)

    def changes(self, snapshot: Snapshot) -> None:
        """What an exit or scheduler-change event shows (picked up by ``refresh``)."""
        self.current = self.pending = snapshot

    def refresh(self, now: float) -> Snapshot | None:
        snap, self.pending = self.pending, None
        return None if snap is None else replace(snap, taken_at=now)

    def deadline(self) -> float | None:
        return None

    def check_changes(self, now: float) -> bool:
        return False

    def fds(self) -> list[int]:
        return []

    def handle_readable(self, fd: int) -> None:
        pass

    def set_interest(self, interest) -> None:
        pass

    def close(self) -> None:
        pass


def config(hold_ms: int = 500, sweep_ms: int = 60000, extra: str = "") -> Config:
    return parse_config(f"""[agent]
sweep_interval_ms = {sweep_ms}
[policy]
hold_time_ms = {hold_ms}
min_change_interval_ms = 0
{extra}""".encode())


def make_core(observer, cfg: Config, clock: FakeClock, links: ScriptedLinks | None = None,
              default_path: str = "/nonexistent/guestagent.toml",
              set_affinity=lambda tid, cpus: None) -> AgentCore:
    log = logging.getLogger("guestagent.test")
    notes = Notes(log)
    links = links or ScriptedLinks()
    uplink = Uplink(notes, log, Counter(), find=links.find, opener=links.open)
    return AgentCore(cfg, observer, uplink, notes, clock, log, default_path=default_path,
                     set_affinity=set_affinity)


def run_until(core: AgentCore, clock: FakeClock, until: float, tick: float = 0.01) -> None:
    """Step the core on the fake clock: at each of its deadlines, or every ``tick``."""
    while clock.now < until:
        timers = core.step(clock.now)
        due = min((t for t in timers.values() if t is not None and t > clock.now),
                  default=until)
        clock.now = min(due, clock.now + tick, until)
    core.step(clock.now)
