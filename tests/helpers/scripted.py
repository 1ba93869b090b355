"""A scripted stand-in for a host link: each test says what the guest publishes."""

from __future__ import annotations

from dataclasses import dataclass, field

from guestagent.host.config import HostLimits
from guestagent.protocol.model import PeerState, Request, SchedClass, VcpuHint

LIMITS = HostLimits(max_rt_priority=40, max_boosted=1, heartbeat_period=0.2,
                    lease_periods=1.5, min_change_interval=0.0, capacity_period=0.1)


@dataclass
class View:
    guest_state: PeerState = PeerState.ABSENT
    generation: int = 0
    hints: tuple = ()
    last_heard: float | None = None


@dataclass
class ScriptedLink:
    kind: str = "scripted"
    state: View = field(default_factory=View)
    published: list = field(default_factory=list)
    fail: bool = False

    def fileno(self):
        return None

    def on_readable(self, now):
        pass

    def publish_capacity(self, caps, now):
        if self.fail:
            raise ValueError("hostile bytes made the link choke")
        self.published.append(tuple(caps))

    def tick(self, now):
        return None

    def view(self):
        if self.fail:
            raise ValueError("hostile bytes made the link choke")
        return self.state

    def close(self):
        pass

    def guest(self, *hints, now, generation=1, state=PeerState.RUNNING):
        self.state = View(state, generation, tuple(hints), now)




def fifo(vcpu, prio, group=0):
    return VcpuHint(vcpu, Request.BOOST, SchedClass.FIFO, rt_priority=prio, group=group)
