"""Channel links: the protocol connection over a virtio-serial port or unix socket."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

from guestagent.errors import GuestagentError
from guestagent.protocol import (
    BadLine,
    Connection,
    GuestConnection,
    HeartbeatWatch,
    HostConnection,
    LinkState,
    Refused,
    Resync,
    encode_message,
)
from guestagent.protocol.messages import (
    Ack,
    Capacity,
    Error,
    Heartbeat,
    Hello,
    Hints,
    Welcome,
)
from guestagent.protocol.model import (
    HEARTBEAT_PERIOD,
    STALE_AFTER,
    Feature,
    PeerState,
    VcpuCapacity,
    VcpuHint,
)
from guestagent.transport import stream
from guestagent.transport.complaints import Complaints
from guestagent.transport.link import (
    ALL_FEATURES,
    Backoff,
    GuestView,
    HostView,
    LinkErrors,
    new_epoch,
)

MAX_BACKLOG = 1 << 20  # unsent bytes beyond this: the peer is not reading; reconnect
FLUSH_RETRY = 0.05  # seconds between write attempts while output is pending
READS_PER_WAKEUP = 16  # bound the work one readable fd can cause


class _ChannelEnd:
    """What both ends share: the stream, output coalescing, heartbeats, back-off."""

    kind = "channel"

    def __init__(self, conn: Connection, heartbeat_period: float, stale_after: float) -> None:
        self.conn = conn
        self.complain = Complaints("channel")
        self._stale_after = stale_after
        self._synced_at = 0.0  # when our last sync was sent
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._parked = False  # port open but its host end closed (POLLHUP)
        self._retry_at: float | None = 0.0
        self._backoff = Backoff()
        self._sending = bytearray()
        self._coalesced: dict[str, bytes] = {}  # newest of each kind, sent when idle
        self._period = heartbeat_period
        self._next_heartbeat = 0.0
        self._hb_seq = 0
        self.state = PeerState.STARTING  # our own lifecycle state
        self._watch = HeartbeatWatch(stale_after)
        self._io_errors = 0
        self._peer_errors = 0
        self._reason = ""
        self._now = 0.0
        self.wakeups = 0  # on_readable calls, for back-off checks

    # -- what the owner's loop calls ------------------------------------------------

    def fileno(self) -> int | None:
        if self._fd is None or self._parked:
            return None
        return self._fd

    def on_readable(self, now: float) -> None:
        self._now = now
        self.wakeups += 1
        if self._fd is None or self._parked:
            return
        for _ in range(READS_PER_WAKEUP):
            try:
                data = stream.read_some(self._fd)
            except OSError as err:
                self._lost(now, f"read failed: {err.strerror or err}")
                return
            if data is None:
                break
            if not data:
                self._lost(now, "peer closed the channel")
                return
            self._dispatch(self.conn.receive_data(data), now)
            if self._fd is None:
                return
        self._flush(now)

    def tick(self, now: float) -> float | None:
        self._now = now
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._reopen(now)
        if self._fd is not None and not self._parked:
            if self.conn.awaiting_sync_ack and now - self._synced_at > self._stale_after:
                # our sync (or its ack) was lost: ask again rather than wait forever
                self.complain("no-sync-ack", f"no sync-ack within {self._stale_after:g} s; "
                              "syncing again", now)
                self.conn.resync()
                self._synced_at = now
            if now >= self._next_heartbeat and self.conn.allows(Heartbeat):
                self._heartbeat(now)
            self._flush(now)
        deadlines = [d for d in (self._retry_at,) if d is not None]
        if self._fd is not None and not self._parked:
            deadlines.append(self._next_heartbeat)
            if self.conn.awaiting_sync_ack:
                deadlines.append(self._synced_at + self._stale_after)
            if self._sending or self._coalesced:
                deadlines.append(now + FLUSH_RETRY)
        return min(deadlines) if deadlines else None

    def set_state(self, state: PeerState, now: float) -> None:
        self.state = state
        if self._fd is not None and not self._parked and self.conn.allows(Heartbeat):
            self._heartbeat(now)
            self._flush(now)

    def close(self) -> None:
        self._drop()
        self._retry_at = None

    # -- internals ------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        self._hb_seq += 1
        self._coalesced["heartbeat"] = self.conn.encode(Heartbeat(self._hb_seq, self.state,
                                                                  self.conn.epoch))
        self._next_heartbeat = now + self._period

    def _flush(self, now: float) -> None:
        if self._fd is None or self._parked:
            return
        self._sending += self.conn.data_to_send()
        if not self._sending and self._coalesced:
            for data in self._coalesced.values():
                self._sending += data
            self._coalesced.clear()
        if not self._sending:
            return
        try:
            written = stream.write_some(self._fd, self._sending)
        except OSError as err:
            self._lost(now, f"write failed: {err.strerror or err}")
            return
        if written < 0:
            self._lost(now, "peer closed the channel")
            return
        del self._sending[:written]
        if len(self._sending) > MAX_BACKLOG:
            self._lost(now, "peer stopped reading")

    def _connected(self, fd: int, sock: socket.socket | None, now: float) -> None:
        self._fd, self._sock, self._parked = fd, sock, False
        self._backoff.reset()
        self._sending.clear()
        self._coalesced.clear()
        self.conn.connect()
        self._synced_at = now
        self._next_heartbeat = now
        self._flush(now)

    def _drop(self) -> None:
        """Forget the stream (closing it) and the session on it."""
        if self._sock is not None:
            self._sock.close()
        elif self._fd is not None:
            os.close(self._fd)
        self._fd, self._sock, self._parked = None, None, False
        self._sending.clear()
        self._coalesced.clear()
        self.conn.disconnect()
        self._watch.forget()
        self._on_down()

    def _connect_socket(self, now: float) -> None:
        """Connect to the peer's unix socket, or count the failure and back off."""
        try:
            sock = stream.connect_unix(self.path)
        except OSError as err:
            self._io_errors += 1
            self._reason = f"cannot connect to {self.path}: {err.strerror or err}"
            self._retry_at = now + self._backoff.next()
            return
        self._connected(sock.fileno(), sock, now)

    def _lost(self, now: float, reason: str) -> None:
        self._reason = reason
        self._drop()
        self._retry_at = now + self._backoff.next()

    def _dispatch(self, events: list, now: float) -> None:
        for event in events:
            if isinstance(event, BadLine):
                self.complain(event.kind, event.reason, now)
                continue
            self._watch.heard(now)
            if isinstance(event, Error):
                self._peer_errors += 1
                self._reason = f"peer error {event.code}: {event.message}"[:200]
                self.complain("peer-error", self._reason, now)
            self._event(event, now)

    def _errors(self) -> LinkErrors:
        return LinkErrors.of(self.conn.counters, io_errors=self._io_errors,
                             peer_errors=self._peer_errors)

    def _queue(self, key: str, kind: type, data: bytes) -> None:
        """Coalesce pre-encoded bytes of a message the connection's state allows."""
        self.conn.check_send(kind)
        self._coalesced[key] = data

    def _link(self) -> LinkState:
        state = self.conn.state
        if state == LinkState.UP and self._watch.stale(self._now):
            return LinkState.DOWN
        return state

    def _reopen(self, now: float) -> None:
        raise NotImplementedError

    def _event(self, event: object, now: float) -> None:
        raise NotImplementedError

    def _on_down(self) -> None:
        raise NotImplementedError


class ChannelGuestLink(_ChannelEnd):
    """The guest's channel: a virtio-serial port (name or path) or a unix socket path."""

    def __init__(self, path: str, nr_vcpus: int, features: Feature = ALL_FEATURES,
                 epoch: int | None = None, heartbeat_period: float = HEARTBEAT_PERIOD,
                 stale_after: float = STALE_AFTER) -> None:
        super().__init__(GuestConnection(features, epoch or new_epoch(), nr_vcpus),
                         heartbeat_period, stale_after)
        self.conn: GuestConnection
        self._is_socket = stream.is_socket(path)
        self.path = path if self._is_socket else stream.resolve_port(path)
        self._table: bytes | None = None
        self._host_state = PeerState.ABSENT
        self._capacity: tuple[VcpuCapacity, ...] | None = None
        self._capacity_at: float | None = None
        self._acked = 0
        if not self._is_socket:
            self._open_port(0.0)

    def _open_port(self, now: float) -> None:
        try:
            fd = stream.open_port(self.path)
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise GuestagentError(f"{self.path} is held by another process") from None
            raise GuestagentError(f"cannot open {self.path}: {err.strerror or err}") from None
        self._connected(fd, None, now)

    def _reopen(self, now: float) -> None:
        if self._parked and self._fd is not None:
            if stream.hung_up(self._fd):  # host end still closed: wait longer
                self._retry_at = now + self._backoff.next()
                return
            self._connected(self._fd, None, now)
        elif self._is_socket:
            self._connect_socket(now)
        elif self._fd is None:
            try:
                self._open_port(now)
            except GuestagentError as err:
                self._io_errors += 1
                self._reason = str(err)
                self._retry_at = now + self._backoff.next()

    def _lost(self, now: float, reason: str) -> None:
        if self._is_socket or self._fd is None:
            super()._lost(now, reason)
            return
        # A port stays open: read() returns 0 and poll() reports POLLHUP for as long
        # as the host end is closed. Park it (not polled) and look again later.
        self._reason = reason
        self._sending.clear()
        self._coalesced.clear()
        self.conn.disconnect()
        self._watch.forget()
        self._on_down()
        self._parked = True
        self._retry_at = now + self._backoff.next()

    def _on_down(self) -> None:
        self._host_state = PeerState.ABSENT

    def publish(self, hints: Sequence[VcpuHint], generation: int, now: float) -> None:
        self._table = encode_message(Hints(generation, tuple(hints)))
        if self.conn.allows(Hints):
            self._queue("table", Hints, self._table)
            self._flush(now)

    def _event(self, event: object, now: float) -> None:
        if isinstance(event, Welcome):
            if event.accepted:
                self._host_state = PeerState.RUNNING
                self._reason = ""
                self._heartbeat(now)
                if self._table is not None:
                    self._queue("table", Hints, self._table)
            else:
                self._reason = f"refused by host: {event.reason}"
                self.complain("refused", self._reason, now)
        elif isinstance(event, Refused):
            self._reason = f"refusing host: {event.reason}"
            self.complain("refused", self._reason, now)
        elif isinstance(event, Heartbeat):
            self._host_state = event.state
        elif isinstance(event, Capacity):
            self._capacity, self._capacity_at = event.capacities, now
        elif isinstance(event, Ack):
            self._acked = event.generation
        elif isinstance(event, Resync):
            self._host_state = PeerState.ABSENT

    def view(self) -> GuestView:
        link = self._link()
        usable = (link == LinkState.UP and Feature.CAPACITY in self.conn.features
                  and self._host_state not in (PeerState.STOPPING, PeerState.ABSENT))
        capacity = self._capacity if usable else None
        age = (self._now - self._capacity_at
               if capacity is not None and self._capacity_at is not None else None)
        return GuestView("channel", link, self._host_state, self.conn.features, capacity, age,
                         self._acked, self._watch.last_change,
                         "" if link == LinkState.UP else self._reason, self._errors())


class ChannelHostLink(_ChannelEnd):
    """The host's channel: QEMU's chardev unix socket.

    listen=False (default): QEMU listens (server=on); connect, reconnecting
    with back-off. listen=True: listen on path and take QEMU's (or a test's)
    connection, one at a time.
    """

    def __init__(self, path: str, features: Feature = ALL_FEATURES, epoch: int | None = None,
                 listen: bool = False, heartbeat_period: float = HEARTBEAT_PERIOD,
                 stale_after: float = STALE_AFTER) -> None:
        super().__init__(HostConnection(features, epoch or new_epoch()), heartbeat_period,
                         stale_after)
        self.conn: HostConnection
        self.state = PeerState.RUNNING  # a host link that is ticking is serving
        self.path = path
        self._listener = stream.listen_unix(path) if listen else None
        if self._listener is not None:
            self._retry_at = None  # nothing to retry: wait for connections
        self._guest_state = PeerState.ABSENT
        self._generation = 0
        self._hints: tuple[VcpuHint, ...] = ()
        self._table: bytes | None = None
        self._ack: int | None = None
        self._guest_epoch = 0  # of the last hello
        self._cap_seq = 0

    def fileno(self) -> int | None:
        if self._fd is None and self._listener is not None:
            return self._listener.fileno()
        return super().fileno()

    def on_readable(self, now: float) -> None:
        if self._fd is None and self._listener is not None:
            self._now = now
            self.wakeups += 1
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._io_errors += 1
                return
            sock.setblocking(False)
            self._connected(sock.fileno(), sock, now)
            return
        super().on_readable(now)

    def _reopen(self, now: float) -> None:
        if self._listener is not None:
            return  # the next connection arrives on the listener
        self._connect_socket(now)

    def _lost(self, now: float, reason: str) -> None:
        super()._lost(now, reason)
        if self._listener is not None:
            self._retry_at = None

    def _on_down(self) -> None:
        self._guest_state = PeerState.ABSENT
        self._forget_session()

    def _forget_session(self) -> None:
        """The guest's session ended (the stream dropped, it synced, or a hello of
        another epoch came): its hints must not be acted on in the next session,
        which starts neutral until the guest sends a table of its own."""
        self._generation, self._hints = 0, ()
        self._ack = None  # a new session needs the acknowledgement again

    def _event(self, event: object, now: float) -> None:
        if isinstance(event, Hello):
            if self._guest_epoch != event.epoch:
                self._forget_session()
                # Nor its state: a host that took the old session's RUNNING for the new
                # one's held a lease until the new guest's first heartbeat (STARTING).
                self._guest_state = PeerState.ABSENT
            self._guest_epoch = event.epoch
            if self.conn.state == LinkState.UP:
                self._reason = ""
                if self._guest_state == PeerState.ABSENT:
                    self._guest_state = PeerState.STARTING
                if self._table is not None:
                    self._queue("table", Capacity, self._table)
                self._heartbeat(now)
            else:
                self._reason = f"refused guest: {event.major}.{event.minor} {event.protocol!r}"
        elif isinstance(event, Hints):
            self._generation, self._hints = event.generation, event.hints
        elif isinstance(event, Heartbeat):
            self._guest_state = event.state
        elif isinstance(event, Resync):
            self._guest_state = PeerState.ABSENT
            self._forget_session()

    def publish_capacity(self, caps: Sequence[VcpuCapacity], now: float) -> None:
        self._cap_seq += 1
        acked = max((c.acked_generation for c in caps), default=0)
        self._table = encode_message(Capacity(self._cap_seq, tuple(caps)))
        if not self.conn.allows(Capacity):
            return
        if Feature.CAPACITY in self.conn.features:
            self._queue("table", Capacity, self._table)
        if acked != self._ack:
            self._ack = acked
            self._coalesced["ack"] = self.conn.encode(Ack(acked))
        self._flush(now)

    def view(self) -> HostView:
        link = self._link()
        return HostView("channel", link, self._guest_state, self.conn.features,
                        self._generation, self._hints, self._watch.last_change,
                        "" if link == LinkState.UP else self._reason, self._errors())

    def close(self) -> None:
        super().close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
