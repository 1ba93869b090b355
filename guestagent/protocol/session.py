"""Region sessions, one per role: what to write and what was read, without the mapping.

The region's counterpart of the channel's connections. A session decides
formatting, verdicts, epochs, acknowledgements and liveness; the region
links read and write the lines it names (under their seqlocks) and pass the
bytes in. No IO and no clock: time is passed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from guestagent.protocol.errors import RemoteProtocolError
from guestagent.protocol.liveness import HeartbeatWatch, LinkState
from guestagent.protocol.model import (
    HEARTBEAT_PERIOD,
    PROTOCOL_NAME,
    STALE_AFTER,
    VERSION_MAJOR,
    VERSION_MINOR,
    Feature,
    PeerState,
    VcpuCapacity,
    VcpuHint,
)
from guestagent.protocol.negotiation import negotiate
from guestagent.protocol.region import (
    MAGIC,
    GuestControl,
    HostControl,
    RegionLayout,
    Verdict,
    check_layout,
    decode_guest_control,
    decode_header,
    decode_host_control,
    decode_host_slot,
)

__all__ = ["GuestRegionSession", "HostRegionSession", "layout_to_keep", "reformat_problem"]


def reformat_problem(header: bytes) -> str | None:
    """While running: why the guest must not re-format a region whose header changed
    under it (another protocol's magic: never overwritten), or None if it may."""
    if header[0:8] in (bytes(8), MAGIC):
        return None
    return f"region was taken over (magic {header[0:8]!r}): not overwritten"


def layout_to_keep(header: bytes, mapped_size: int, nr_vcpus: int) -> RegionLayout | None:
    """The guest's choice at attach: the layout of a region already formatted for
    nr_vcpus, or None to format it. RemoteProtocolError for another protocol's region
    (never overwritten)."""
    if header[0:8] == bytes(8):
        return None  # zeroed: ours to format
    parsed = decode_header(header)
    try:
        lay = check_layout(parsed, mapped_size)
    except RemoteProtocolError:
        return None  # ours, but another layout or major: this guest decides it
    return lay if lay.nr_vcpus == nr_vcpus else None


class GuestRegionSession:
    """The guest's end: its control line, the host's verdict, capacity and liveness."""

    def __init__(self, features: Feature, epoch: int, nr_vcpus: int,
                 heartbeat_period: float = HEARTBEAT_PERIOD,
                 stale_after: float = STALE_AFTER) -> None:
        self.nr_vcpus = nr_vcpus
        self.control = GuestControl(PeerState.STARTING, features, epoch, 0, 0)
        self.host = HostControl()
        self._host_seq: int | None = None
        self._period = heartbeat_period
        self.next_heartbeat = 0.0
        self._watch = HeartbeatWatch(stale_after)
        self.capacity: tuple[VcpuCapacity, ...] | None = None
        self.capacity_at: float | None = None
        self.broken = ""  # why the region cannot be used now; "" while it can

    def restart(self, epoch: int) -> GuestControl:
        """The region is re-formatted: a new epoch, and nothing known of the host."""
        self.host, self._host_seq = HostControl(), None
        self.capacity = self.capacity_at = None
        self._watch.forget()
        self.broken = ""
        return self._change(epoch=epoch, heartbeat=0)

    def _change(self, **changes: object) -> GuestControl:
        self.control = dataclasses.replace(self.control, **changes)  # type: ignore[arg-type]
        return self.control

    # -- what the guest writes: each returns the control line to write ------------------

    def published(self, generation: int) -> GuestControl:
        """The slots of this generation are written: announce it."""
        return self._change(generation=generation)

    def set_state(self, state: PeerState) -> GuestControl:
        return self._change(state=state)

    def heartbeat(self, now: float) -> GuestControl | None:
        """The control line with the next heartbeat, if one is due."""
        if now < self.next_heartbeat:
            return None
        self.next_heartbeat = now + self._period
        return self._change(heartbeat=self.control.heartbeat + 1)

    # -- what the guest read ------------------------------------------------------------

    def receive_host(self, seq: int, line: bytes, now: float) -> bool:
        """The host's control line (read consistently, with its seq). True when the
        capacity slots should be read now and passed to receive_capacity()."""
        if seq == self._host_seq:
            return False
        self._host_seq = seq
        self.host = decode_host_control(line)
        self._watch.observe(self.host.heartbeat, now)
        return self.accepted and Feature.CAPACITY in self.features_shared

    def receive_capacity(self, lines: Sequence[bytes] | None, now: float) -> None:
        """The host slots, one line per vCPU; None if one was busy (look again next time)."""
        if lines is None:
            self._host_seq = None
            return
        self.capacity = tuple(decode_host_slot(i, line) for i, line in enumerate(lines))
        self.capacity_at = now

    # -- what the guest knows -----------------------------------------------------------

    @property
    def accepted(self) -> bool:
        h = self.host
        return h.verdict == Verdict.ACCEPTED and h.guest_epoch == self.control.epoch

    @property
    def features_shared(self) -> Feature:
        return Feature(self.control.features & self.host.features)

    @property
    def last_heard(self) -> float | None:
        return self._watch.last_change

    def state(self, now: float) -> LinkState:
        h = self.host
        if self.broken or h.epoch == 0 or h.state == PeerState.ABSENT or self._watch.stale(now):
            return LinkState.DOWN
        if h.guest_epoch != self.control.epoch:
            return LinkState.NEGOTIATING
        return {Verdict.ACCEPTED: LinkState.UP,
                Verdict.REFUSED: LinkState.REFUSED}.get(h.verdict, LinkState.NEGOTIATING)

    def reason(self, state: LinkState) -> str:
        if self.broken:
            return self.broken
        if state == LinkState.DOWN:
            return "host not heard"
        if state == LinkState.REFUSED:
            return f"refused by host speaking {self.host.abi_major}.{self.host.abi_minor}"
        return ""

    def usable_capacity(self, state: LinkState) -> tuple[VcpuCapacity, ...] | None:
        """The capacity, while the host offers it and is not stopping."""
        if state != LinkState.UP or Feature.CAPACITY not in self.features_shared or \
                self.host.state == PeerState.STOPPING:
            return None
        return self.capacity


class HostRegionSession:
    """The host's end: verdicts on guest epochs, the hint table, acks and liveness."""

    def __init__(self, features: Feature, epoch: int,
                 heartbeat_period: float = HEARTBEAT_PERIOD,
                 stale_after: float = STALE_AFTER) -> None:
        self._offered = features
        self.control = HostControl(PeerState.RUNNING, features, epoch, 0, 0, 0,
                                   VERSION_MAJOR, VERSION_MINOR)
        self.guest = GuestControl()
        self._candidate = GuestControl()  # a guest of a new epoch, awaiting judge()
        self.layout: RegionLayout | None = None
        self.in_use = Feature.NONE
        self.generation = 0
        self.hints: tuple[VcpuHint, ...] = ()
        self._period = heartbeat_period
        self.next_heartbeat = 0.0
        self._watch = HeartbeatWatch(stale_after)
        self.reason = ""  # nothing tried yet: the link maps the file first, or says why not
        self.bad_region = 0  # headers found unusable
        self.broken = ""  # why the region cannot be used now (it shrank); "" while it can
        self._judged = b""  # the header the verdict was given on

    def _change(self, **changes: object) -> HostControl:
        self.control = dataclasses.replace(self.control, **changes)  # type: ignore[arg-type]
        return self.control

    def receive_guest(self, line: bytes, now: float) -> bool:
        """The guest's control line. True when its epoch is new: read the header and
        call judge(), then write what it says."""
        guest = decode_guest_control(line)
        if guest.epoch == 0:
            self.guest, self.reason = guest, "guest has not formatted the region"
            return False
        self._candidate = guest
        if guest.epoch == self.control.guest_epoch:
            return False
        # A new epoch ends the session we knew, whatever judge() then says: its hints
        # must not outlive it (a header still unreadable would otherwise keep them
        # until the old heartbeat went stale).
        self.generation, self.hints = 0, ()
        return True

    def judge(self, header: bytes, mapped_size: int) -> Verdict:
        """The verdict on the candidate guest's header.

        NONE: the header is unreadable (not formatted yet): nothing to write, look
        again next time. ACCEPTED: reset the host slots for self.layout, then write
        self.control. REFUSED: write self.control.
        """
        guest = self._candidate
        try:
            parsed = decode_header(header)
        except RemoteProtocolError as err:
            self.bad_region += 1
            self.reason = str(err)
            return Verdict.NONE
        self._watch.forget()
        self.generation, self.hints = 0, ()
        try:
            lay = check_layout(parsed, mapped_size)
        except RemoteProtocolError as err:
            self.bad_region += 1
            self.reason = f"refused guest: {err}"
            self.layout, self.in_use = None, Feature.NONE
            self._change(verdict=Verdict.REFUSED, guest_epoch=guest.epoch, acked_generation=0)
            return Verdict.REFUSED
        outcome = negotiate(PROTOCOL_NAME, parsed.abi_major, parsed.abi_minor, guest.features,
                            self._offered)
        self.layout, self.in_use, self.reason = lay, outcome.features, ""
        self._judged = bytes(header)
        self._change(verdict=Verdict.ACCEPTED, guest_epoch=guest.epoch, acked_generation=0)
        return Verdict.ACCEPTED

    def check_header(self, header: bytes) -> bool:
        """At every heartbeat: the header must still be the one accepted. If it is not
        (zeroed, another magic or major, re-formatted), forget the guest: nothing is
        written until a guest epoch is judged again. True if it still holds."""
        if not self.accepted or header == self._judged:
            return True
        self.bad_region += 1
        try:
            decode_header(header)
            why = "region header changed"
        except RemoteProtocolError as err:
            why = str(err)
        self.reason = f"{why}: waiting for the guest to format it again"
        self.layout, self.in_use, self._judged = None, Feature.NONE, b""
        self.generation, self.hints = 0, ()
        self._watch.forget()
        self._change(verdict=Verdict.NONE, guest_epoch=0, acked_generation=0)
        return False

    def wants_hints(self, now: float) -> bool:
        """After receive_guest() (and judge(), if it asked): take the candidate as the
        guest. True when its generation is new: read the slots, call receive_hints()."""
        if self._candidate.epoch != self.control.guest_epoch:
            return False  # not judged (header unreadable)
        self.guest = self._candidate
        self._watch.observe(self.guest.heartbeat, now)
        return self.accepted and self.guest.generation != self.generation

    def receive_hints(self, hints: Sequence[VcpuHint]) -> None:
        self.generation, self.hints = self.guest.generation, tuple(hints)

    def heartbeat(self, now: float) -> HostControl | None:
        """The control line with the next heartbeat, if one is due and a guest is there
        to read it (a host never writes into a region no guest has formatted)."""
        if now < self.next_heartbeat:
            return None
        self.next_heartbeat = now + self._period
        if not self.control.guest_epoch:
            return None
        return self._change(heartbeat=self.control.heartbeat + 1)

    def acknowledge(self, caps: Sequence[VcpuCapacity]) -> HostControl:
        """The control line announcing capacity slots just written (only once accepted)."""
        acked = max((c.acked_generation for c in caps), default=self.control.acked_generation)
        return self._change(acked_generation=acked)

    @property
    def accepted(self) -> bool:
        return self.control.verdict == Verdict.ACCEPTED and self.layout is not None

    @property
    def last_heard(self) -> float | None:
        return self._watch.last_change

    def state(self, now: float) -> LinkState:
        if self.broken or self.guest.epoch == 0 or self.control.guest_epoch == 0:
            return LinkState.DOWN
        if self.control.verdict == Verdict.REFUSED:
            return LinkState.REFUSED
        return LinkState.DOWN if self._watch.stale(now) else LinkState.UP
