"""Region links: the protocol over a shared mapping (ivshmem BAR 2 or a file).

Timer-driven (fileno() is None): tick() writes heartbeats and polls the
other side's lines. Each side writes only its own lines, under seqlocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from guestagent.errors import GuestagentError
from guestagent.protocol import (
    GUEST_CONTROL_OFFSET,
    HEADER_SIZE,
    HEARTBEAT_PERIOD,
    HOST_CONTROL_OFFSET,
    MAGIC,
    STALE_AFTER,
    Feature,
    GuestControl,
    GuestRegionSession,
    HostControl,
    HostRegionSession,
    LinkState,
    PeerState,
    RegionLayout,
    RemoteProtocolError,
    VcpuCapacity,
    VcpuHint,
    Verdict,
    decode_guest_slot,
    encode_guest_control,
    encode_guest_slot,
    encode_header,
    encode_host_control,
    encode_host_slot,
    layout_to_keep,
    line_seq,
    reformat_problem,
    region_size_for,
)
from guestagent.transport.complaints import Complaints
from guestagent.transport.link import (
    ALL_FEATURES,
    Backoff,
    GuestView,
    HostView,
    LinkErrors,
    new_epoch,
)
from guestagent.transport.region import MappedRegion, map_file, map_ivshmem
from guestagent.transport.seqlock import read_line, write_line

_HEADER_BYTES = 128  # the static header: what sessions judge


def map_region(path: str, min_size: int, create_size: int | None = None,
               lock: bool = False) -> MappedRegion:
    """'ivshmem' or 'ivshmem:<PCI address>' for the device, anything else is a file."""
    if path == "ivshmem" or path.startswith("ivshmem:"):
        return map_ivshmem(path.partition(":")[2] or None, min_size=min_size, lock=lock)
    return map_file(path, size=create_size, min_size=min_size, lock=lock)


class RegionGuestLink:
    """The guest's end of a region: formats or keeps it, moves the session's lines."""

    kind = "region"

    def __init__(self, path: str, nr_vcpus: int, features: Feature = ALL_FEATURES,
                 epoch: int | None = None, create: bool = False, poll_interval: float = 0.1,
                 heartbeat_period: float = HEARTBEAT_PERIOD,
                 stale_after: float = STALE_AFTER) -> None:
        size = region_size_for(nr_vcpus)
        # the guest locks its region: a second agent would overwrite the first one's hints
        self._region = map_region(path, size, size if create else None, lock=True)
        self._mm = self._region.mm
        self._session = GuestRegionSession(features, epoch or new_epoch(), nr_vcpus,
                                           heartbeat_period, stale_after)
        self.complain = Complaints("region")
        self._hints: Sequence[VcpuHint] = tuple(VcpuHint(i) for i in range(nr_vcpus))
        self._written: list[VcpuHint | None] = [None] * nr_vcpus
        self._layout = self._attach(nr_vcpus)
        self._header = bytes(self._mm[:_HEADER_BYTES])  # what every heartbeat checks
        self._blocked = False  # the mapping could not be touched at the last look
        self.publish(self._hints, 0, 0.0)
        self._poll = poll_interval
        self._busy = 0
        self._now = 0.0

    def _attach(self, nr_vcpus: int) -> RegionLayout:
        """Keep a region already formatted for us, reformat ours or a zeroed one,
        refuse one of another protocol."""
        try:
            kept = layout_to_keep(self._mm[:_HEADER_BYTES], self._region.size, nr_vcpus)
        except RemoteProtocolError as err:
            self._region.close()
            raise GuestagentError(f"{self._region.source}: {err}") from None
        if kept is not None:
            return kept
        return self._format(RegionLayout(nr_vcpus))

    def _format(self, lay: RegionLayout) -> RegionLayout:
        """Zero and format the region, with the current hints in their slots."""
        # magic first to zero and last to set: no reader sees a half-written header
        self._mm[0:8] = bytes(8)
        self._mm[8:lay.region_size] = bytes(lay.region_size - 8)
        self._mm[8:_HEADER_BYTES] = encode_header(lay)[8:]
        generation = self._session.control.generation
        for i, hint in enumerate(self._hints):
            if hint != VcpuHint(i):  # zeroed slots already read as neutral
                write_line(self._mm, lay.guest_slot(i), encode_guest_slot(hint, generation))
            self._written[i] = hint
        self._write_control(self._session.control)
        self._mm[0:8] = MAGIC
        return lay

    def _revalidate(self, now: float) -> None:
        """At every heartbeat: the header must be the one this guest wrote (or kept).
        If not, re-format with a new epoch: the host judges it afresh."""
        if self._mm[:_HEADER_BYTES] == self._header:
            return
        self.complain("bad-header", "region header changed under the guest; formatting it "
                      "again with a new epoch", now)
        self._session.restart(new_epoch())
        self._format(self._layout)
        self._header = bytes(self._mm[:_HEADER_BYTES])

    def _usable(self, now: float) -> bool:
        """Whether the mapping may be touched now: not while the file is shorter than
        the mapping (a SIGBUS), nor written while another protocol's magic is in it."""
        problem = self._region.shrunk() or reformat_problem(self._mm[:8])
        if problem is not None:
            if problem != self._session.broken:
                self.complain("bad-region", problem, now)
            self._session.broken, self._blocked = problem, True
            return False
        self._session.broken = ""
        if self._blocked:  # whole again, but what is in the slots now is unknown
            self._blocked = False
            self._written = [None] * self._layout.nr_vcpus
            self.publish(self._hints, self._session.control.generation, now)
        return True

    def publish(self, hints: Sequence[VcpuHint], generation: int, now: float) -> None:
        if len(hints) != self._layout.nr_vcpus:
            raise GuestagentError(f"{len(hints)} hints for a region of "
                                  f"{self._layout.nr_vcpus} vCPUs")
        self._hints = hints
        if not self._usable(now):
            self._session.published(generation)  # written once the region is whole
            return
        for i, hint in enumerate(hints):
            # Identity first: unchanged hints are the same objects, and a
            # dataclass comparison costs a microsecond per slot.
            if hint is not self._written[i] and hint != self._written[i]:
                write_line(self._mm, self._layout.guest_slot(i),
                           encode_guest_slot(hint, generation))
                self._written[i] = hint
        # slots first, then the generation that announces them
        self._write_control(self._session.published(generation))

    def set_state(self, state: PeerState, now: float) -> None:
        ctl = self._session.set_state(state)
        if self._usable(now):
            self._write_control(ctl)

    def tick(self, now: float) -> float | None:
        self._now = now
        session = self._session
        ctl = session.heartbeat(now)
        if not self._usable(now):
            return min(now + self._poll, session.next_heartbeat)
        if ctl is not None:
            self._revalidate(now)
            self._write_control(session.control)
        line = read_line(self._mm, HOST_CONTROL_OFFSET)
        if line is None:
            self._busy += 1
        elif session.receive_host(line_seq(line), line, now):
            session.receive_capacity(self._read_capacity(), now)
        return min(now + self._poll, session.next_heartbeat)

    def fileno(self) -> int | None:
        return None

    def on_readable(self, now: float) -> None:
        self._now = now

    def _write_control(self, ctl: GuestControl) -> None:
        write_line(self._mm, GUEST_CONTROL_OFFSET, encode_guest_control(ctl))

    def _read_capacity(self) -> list[bytes] | None:
        lines = []
        for i in range(self._layout.nr_vcpus):
            line = read_line(self._mm, self._layout.host_slot(i))
            if line is None:
                self._busy += 1
                return None
            lines.append(line)
        return lines

    def view(self) -> GuestView:
        session = self._session
        link = session.state(self._now)
        up = link == LinkState.UP
        capacity = session.usable_capacity(link)
        age = (self._now - session.capacity_at
               if capacity is not None and session.capacity_at is not None else None)
        host = session.host
        return GuestView("region", link, host.state if link != LinkState.DOWN else
                         PeerState.ABSENT, session.features_shared if up else Feature.NONE,
                         capacity, age, host.acked_generation if up else 0,
                         session.last_heard, session.reason(link),
                         LinkErrors(busy_reads=self._busy))

    def close(self) -> None:
        self._region.close()


class RegionHostLink:
    """The host's end of a region: maps it when it appears, moves the session's lines."""

    kind = "region"

    def __init__(self, path: str, features: Feature = ALL_FEATURES, epoch: int | None = None,
                 poll_interval: float = 0.01, heartbeat_period: float = HEARTBEAT_PERIOD,
                 stale_after: float = STALE_AFTER) -> None:
        self.path = path
        self._region: MappedRegion | None = None
        self._session = HostRegionSession(features, epoch or new_epoch(), heartbeat_period,
                                          stale_after)
        self._written: list[VcpuCapacity | None] = []
        self.complain = Complaints("region")
        self._poll = poll_interval
        self._backoff = Backoff(1.0, 5.0)
        self._retry_at = 0.0
        self._busy = self._io = 0
        self._now = 0.0

    def fileno(self) -> int | None:
        return None

    def on_readable(self, now: float) -> None:
        self._now = now

    def _write_control(self, ctl: HostControl) -> None:
        if self._region is not None:
            write_line(self._region.mm, HOST_CONTROL_OFFSET, encode_host_control(ctl))

    def tick(self, now: float) -> float | None:
        self._now = now
        session = self._session
        if self._region is None:
            if now < self._retry_at:
                return self._retry_at
            try:
                self._region = map_region(self.path, HEADER_SIZE)
                self._backoff.reset()
                session.reason = "region mapped; the guest has not written it yet"
            except GuestagentError as err:
                self._io += 1
                session.reason = str(err)
                self._retry_at = now + self._backoff.next()
                return self._retry_at
        problem = self._region.shrunk()
        if problem is not None:  # touching the mapping now would be a SIGBUS
            if not session.broken:
                self.complain("bad-region", problem, now)
            session.broken = problem
            return now + max(self._poll, 0.1)
        session.broken = ""
        due = now >= session.next_heartbeat
        if due and not session.check_header(self._region.mm[:_HEADER_BYTES]):
            self.complain("bad-header", session.reason, now)
        self._poll_guest(now)
        ctl = session.heartbeat(now)
        if ctl is not None:
            self._write_control(ctl)
        return min(now + self._poll, session.next_heartbeat)

    def _poll_guest(self, now: float) -> None:
        assert self._region is not None
        mm, session = self._region.mm, self._session
        line = read_line(mm, GUEST_CONTROL_OFFSET)
        if line is None:
            self._busy += 1
            if not session.control.guest_epoch:  # never accepted: likely not a region at all
                session.reason = ("the guest's control line never reads whole: not a region "
                                  "a guest formatted (wrong file?)")
            return
        if session.receive_guest(line, now):
            verdict = session.judge(mm[:_HEADER_BYTES], self._region.size)
            if verdict == Verdict.ACCEPTED:
                assert session.layout is not None
                self._written = [None] * session.layout.nr_vcpus
                self._write_slots([VcpuCapacity(i) for i in range(session.layout.nr_vcpus)])
            if verdict != Verdict.NONE:
                self._write_control(session.control)
        if session.wants_hints(now):
            self._read_hints()

    def _read_hints(self) -> None:
        assert self._region is not None and self._session.layout is not None
        lay = self._session.layout
        hints = []
        for i in range(lay.nr_vcpus):
            line = read_line(self._region.mm, lay.guest_slot(i))
            if line is None:
                self._busy += 1
                return  # the guest is mid-update: the next tick sees it whole
            hints.append(decode_guest_slot(i, line)[0])
        self._session.receive_hints(hints)

    def _write_slots(self, caps: Sequence[VcpuCapacity]) -> None:
        assert self._region is not None and self._session.layout is not None
        nr = self._session.layout.nr_vcpus
        for cap in caps:
            if 0 <= cap.vcpu < nr and cap != self._written[cap.vcpu]:
                write_line(self._region.mm, self._session.layout.host_slot(cap.vcpu),
                           encode_host_slot(cap))
                self._written[cap.vcpu] = cap

    def publish_capacity(self, caps: Sequence[VcpuCapacity], now: float) -> None:
        if self._region is None or not self._session.accepted or self._region.shrunk():
            return  # (a shrunk file is noticed, and logged, at the next tick)
        self._write_slots(caps)  # slots first, then the control line that announces them
        self._write_control(self._session.acknowledge(caps))

    def view(self) -> HostView:
        session = self._session
        link = LinkState.DOWN if self._region is None else session.state(self._now)
        up = link == LinkState.UP
        return HostView("region", link, session.guest.state if up else PeerState.ABSENT,
                        session.in_use, session.generation, session.hints, session.last_heard,
                        "" if up else session.broken or session.reason or "guest not heard",
                        LinkErrors(busy_reads=self._busy, bad_region=session.bad_region,
                                   io_errors=self._io))

    def close(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None
