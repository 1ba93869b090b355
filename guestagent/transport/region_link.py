"""Region links: the protocol over a shared mapping (ivshmem BAR 2 or a file).

Timer-driven (fileno() is None): tick() writes heartbeats and polls the
other side's lines. Each side writes only its own lines, under seqlocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from guestagent.errors import GuestagentError
from guestagent.protocol.errors import ProtocolError
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
    GUEST_CONTROL_OFFSET,
    HOST_CONTROL_OFFSET,
    MAGIC,
    GuestControl,
    HostControl,
    RegionLayout,
    Verdict,
    check_layout,
    decode_guest_control,
    decode_guest_slot,
    decode_header,
    decode_host_control,
    decode_host_slot,
    encode_guest_control,
    encode_guest_slot,
    encode_header,
    encode_host_control,
    encode_host_slot,
    line_seq,
    region_size_for,
)
from guestagent.transport.link import (
    ALL_FEATURES,
    Backoff,
    GuestView,
    HeartbeatWatch,
    HostView,
    LinkErrors,
    new_epoch,
)
from guestagent.transport.region import MappedRegion, map_file, map_ivshmem
from guestagent.transport.seqlock import read_line, write_line


def map_region(path: str, min_size: int, create_size: int | None = None) -> MappedRegion:
    """'ivshmem' or 'ivshmem:<PCI address>' for the device, anything else is a file."""
    if path == "ivshmem" or path.startswith("ivshmem:"):
        return map_ivshmem(path.partition(":")[2] or None, min_size=min_size)
    return map_file(path, size=create_size, min_size=min_size)


class RegionGuestLink:
    """The guest's end of a region: formats or validates it, writes hints."""

    kind = "region"

    def __init__(self, path: str, nr_vcpus: int, features: Feature = ALL_FEATURES,
                 epoch: int | None = None, create: bool = False, poll_interval: float = 0.1,
                 heartbeat_period: float = HEARTBEAT_PERIOD,
                 stale_after: float = STALE_AFTER) -> None:
        size = region_size_for(nr_vcpus)
        self._region = map_region(path, size, size if create else None)
        self._mm = self._region.mm
        self._ctl = GuestControl(PeerState.STARTING, features, epoch or new_epoch(), 0, 0)
        self._layout = self._attach(nr_vcpus)
        self._written: list[VcpuHint | None] = [None] * nr_vcpus
        self.publish([VcpuHint(i) for i in range(nr_vcpus)], 0, 0.0)
        self._poll, self._period = poll_interval, heartbeat_period
        self._next_heartbeat = 0.0
        self._watch = HeartbeatWatch(stale_after)
        self._host = HostControl()
        self._host_seq: int | None = None
        self._capacity: tuple[VcpuCapacity, ...] | None = None
        self._capacity_at: float | None = None
        self._busy = 0
        self._now = 0.0

    def _attach(self, nr_vcpus: int) -> RegionLayout:
        """Keep a region already formatted for us, reformat ours or a zeroed one,
        refuse one of another protocol."""
        if self._mm[0:8] != bytes(8):
            try:
                header = decode_header(self._mm[:128])
            except ProtocolError as err:
                self._region.close()
                raise GuestagentError(f"{self._region.source}: {err}") from None
            try:
                lay = check_layout(header, self._region.size)
                if lay.nr_vcpus == nr_vcpus:
                    return lay
            except ProtocolError:
                pass  # ours, but another layout or major: this guest decides it
        lay = RegionLayout(nr_vcpus)
        # magic first to zero and last to set: no reader sees a half-written header
        self._mm[0:8] = bytes(8)
        self._mm[8:lay.region_size] = bytes(lay.region_size - 8)
        self._mm[8:128] = encode_header(lay)[8:]
        write_line(self._mm, GUEST_CONTROL_OFFSET, encode_guest_control(self._ctl))
        self._mm[0:8] = MAGIC
        return lay

    def fileno(self) -> int | None:
        return None

    def on_readable(self, now: float) -> None:
        self._now = now

    def _write_control(self, **changes: object) -> None:
        self._ctl = GuestControl(**{**self._ctl.__dict__, **changes})  # type: ignore[arg-type]
        write_line(self._mm, GUEST_CONTROL_OFFSET, encode_guest_control(self._ctl))

    def publish(self, hints: Sequence[VcpuHint], generation: int, now: float) -> None:
        if len(hints) != self._layout.nr_vcpus:
            raise GuestagentError(f"{len(hints)} hints for a region of "
                                  f"{self._layout.nr_vcpus} vCPUs")
        for i, hint in enumerate(hints):
            # Identity first: unchanged hints are the same objects, and a
            # dataclass comparison costs a microsecond per slot.
            if hint is not self._written[i] and hint != self._written[i]:
                write_line(self._mm, self._layout.guest_slot(i),
                           encode_guest_slot(hint, generation))
                self._written[i] = hint
        self._write_control(generation=generation)  # slots first, then the generation

    def set_state(self, state: PeerState, now: float) -> None:
        self._write_control(state=state)

    def tick(self, now: float) -> float | None:
        self._now = now
        if now >= self._next_heartbeat:
            self._write_control(heartbeat=self._ctl.heartbeat + 1)
            self._next_heartbeat = now + self._period
        line = read_line(self._mm, HOST_CONTROL_OFFSET)
        if line is None:
            self._busy += 1
        elif line_seq(line) != self._host_seq:
            self._host_seq = line_seq(line)
            self._host = decode_host_control(line)
            self._watch.observe(self._host.heartbeat, now)
            if self._accepted() and Feature.CAPACITY in self._features():
                self._read_capacity(now)
        return min(now + self._poll, self._next_heartbeat)

    def _accepted(self) -> bool:
        h = self._host
        return h.verdict == Verdict.ACCEPTED and h.guest_epoch == self._ctl.epoch

    def _features(self) -> Feature:
        return Feature(self._ctl.features & self._host.features)

    def _read_capacity(self, now: float) -> None:
        caps = []
        for i in range(self._layout.nr_vcpus):
            line = read_line(self._mm, self._layout.host_slot(i))
            if line is None:
                self._busy += 1
                self._host_seq = None  # look again next tick
                return
            caps.append(decode_host_slot(i, line))
        self._capacity, self._capacity_at = tuple(caps), now

    def _link(self) -> str:
        h = self._host
        if h.epoch == 0 or h.state == PeerState.ABSENT or self._watch.stale(self._now):
            return "down"
        if h.guest_epoch != self._ctl.epoch:
            return "negotiating"
        return {Verdict.ACCEPTED: "up", Verdict.REFUSED: "refused"}.get(h.verdict, "negotiating")

    def view(self) -> GuestView:
        link = self._link()
        up = link == "up"
        usable = up and Feature.CAPACITY in self._features() and self._host.state != \
            PeerState.STOPPING
        capacity = self._capacity if usable else None
        age = (self._now - self._capacity_at
               if capacity is not None and self._capacity_at is not None else None)
        reason = {"down": "host not heard", "refused":
                  f"refused by host speaking {self._host.abi_major}.{self._host.abi_minor}"
                  }.get(link, "")
        return GuestView("region", link, self._host.state if link != "down" else
                         PeerState.ABSENT, self._features() if up else Feature.NONE,
                         capacity, age, self._host.acked_generation if up else 0,
                         self._watch.last_change, reason, LinkErrors(busy_reads=self._busy))

    def close(self) -> None:
        self._region.close()


class RegionHostLink:
    """The host's end of a region: waits for a formatted region, verdicts, reads hints."""

    kind = "region"

    def __init__(self, path: str, features: Feature = ALL_FEATURES, epoch: int | None = None,
                 poll_interval: float = 0.01, heartbeat_period: float = HEARTBEAT_PERIOD,
                 stale_after: float = STALE_AFTER) -> None:
        self.path = path
        self._features_offered = features
        self._region: MappedRegion | None = None
        self._ctl = HostControl(PeerState.RUNNING, features, epoch or new_epoch(), 0, 0, 0,
                                VERSION_MAJOR, VERSION_MINOR)
        self._layout: RegionLayout | None = None
        self._guest = GuestControl()
        self._in_use = Feature.NONE
        self._generation = 0
        self._hints: tuple[VcpuHint, ...] = ()
        self._written: list[VcpuCapacity | None] = []
        self._poll, self._period = poll_interval, heartbeat_period
        self._next_heartbeat = 0.0
        self._watch = HeartbeatWatch(stale_after)
        self._backoff = Backoff(1.0, 5.0)
        self._retry_at = 0.0
        self._reason = ""  # nothing tried yet: the first tick maps the file or says why not
        self._busy = self._bad = self._io = 0
        self._now = 0.0

    def fileno(self) -> int | None:
        return None

    def on_readable(self, now: float) -> None:
        self._now = now

    def _write_control(self, **changes: object) -> None:
        self._ctl = HostControl(**{**self._ctl.__dict__, **changes})  # type: ignore[arg-type]
        if self._region is not None:
            write_line(self._region.mm, HOST_CONTROL_OFFSET, encode_host_control(self._ctl))

    def tick(self, now: float) -> float | None:
        self._now = now
        if self._region is None:
            if now < self._retry_at:
                return self._retry_at
            try:
                self._region = map_region(self.path, 256)
                self._backoff.reset()
                self._reason = "region mapped; the guest has not written it yet"
            except GuestagentError as err:
                self._io += 1
                self._reason = str(err)
                self._retry_at = now + self._backoff.next()
                return self._retry_at
        self._poll_guest(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self._period
            if self._ctl.guest_epoch:  # never write into a region no guest has formatted
                self._write_control(heartbeat=self._ctl.heartbeat + 1)
        return min(now + self._poll, self._next_heartbeat)

    def _poll_guest(self, now: float) -> None:
        assert self._region is not None
        mm = self._region.mm
        line = read_line(mm, GUEST_CONTROL_OFFSET)
        if line is None:
            self._busy += 1
            if not self._ctl.guest_epoch:  # never accepted: likely not a guestagent region
                self._reason = "the guest's control line never reads whole: not a region a " \
                    "guest formatted (wrong file?)"
            return
        guest = decode_guest_control(line)
        if guest.epoch == 0:
            self._guest, self._reason = guest, "guest has not formatted the region"
            return
        if guest.epoch != self._ctl.guest_epoch:
            if not self._verdict(guest):
                return
        self._guest = guest
        self._watch.observe(guest.heartbeat, now)
        if self._ctl.verdict == Verdict.ACCEPTED and guest.generation != self._generation:
            self._read_hints(guest.generation)

    def _verdict(self, guest: GuestControl) -> bool:
        """A new guest epoch: decide, and (if accepted) reset our slots for it."""
        assert self._region is not None
        try:
            header = decode_header(self._region.mm[:128])
        except ProtocolError as err:
            self._bad += 1
            self._reason = str(err)
            return False  # not formatted (yet): look again next tick
        self._watch.forget()
        self._generation, self._hints = 0, ()
        try:
            lay = check_layout(header, self._region.size)
        except ProtocolError as err:
            self._bad += 1
            self._reason = f"refused guest: {err}"
            self._layout, self._in_use = None, Feature.NONE
            self._write_control(verdict=Verdict.REFUSED, guest_epoch=guest.epoch,
                                acked_generation=0)
            return True
        verdict = negotiate(PROTOCOL_NAME, header.abi_major, header.abi_minor, guest.features,
                            self._features_offered)
        self._layout, self._in_use, self._reason = lay, verdict.features, ""
        self._written = [None] * lay.nr_vcpus
        self._write_slots([VcpuCapacity(i) for i in range(lay.nr_vcpus)])
        self._write_control(verdict=Verdict.ACCEPTED, guest_epoch=guest.epoch,
                            acked_generation=0)
        return True

    def _read_hints(self, generation: int) -> None:
        assert self._region is not None and self._layout is not None
        hints = []
        for i in range(self._layout.nr_vcpus):
            line = read_line(self._region.mm, self._layout.guest_slot(i))
            if line is None:
                self._busy += 1
                return  # the guest is mid-update: the next tick sees it whole
            hints.append(decode_guest_slot(i, line)[0])
        self._generation, self._hints = generation, tuple(hints)

    def _write_slots(self, caps: Sequence[VcpuCapacity]) -> None:
        assert self._region is not None and self._layout is not None
        for cap in caps:
            if 0 <= cap.vcpu < self._layout.nr_vcpus and cap != self._written[cap.vcpu]:
                write_line(self._region.mm, self._layout.host_slot(cap.vcpu),
                           encode_host_slot(cap))
                self._written[cap.vcpu] = cap

    def publish_capacity(self, caps: Sequence[VcpuCapacity], now: float) -> None:
        if self._region is None or self._layout is None or \
                self._ctl.verdict != Verdict.ACCEPTED:
            return
        self._write_slots(caps)  # slots first, then the control line that announces them
        acked = max((c.acked_generation for c in caps), default=self._ctl.acked_generation)
        self._write_control(acked_generation=acked)

    def _link(self) -> str:
        if self._region is None or self._guest.epoch == 0 or self._ctl.guest_epoch == 0:
            return "down"
        if self._ctl.verdict == Verdict.REFUSED:
            return "refused"
        return "down" if self._watch.stale(self._now) else "up"

    def view(self) -> HostView:
        link = self._link()
        state = self._guest.state if link == "up" else PeerState.ABSENT
        return HostView("region", link, state, self._in_use, self._generation, self._hints,
                        self._watch.last_change, "" if link == "up" else self._reason
                        or "guest not heard", LinkErrors(busy_reads=self._busy,
                                                         bad_region=self._bad,
                                                         io_errors=self._io))

    def close(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None
