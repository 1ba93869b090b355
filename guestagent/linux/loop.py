"""One event loop for both daemons: fds that come and go, named timers, signals.

A daemon's cycle is: ``wait()`` (sleep until an fd is readable, a timer is due,
a signal arrives or ``wake()`` is called; readable fds and caught signals are
handed to their callbacks), then do its own work in its own order, reading
which timers ``wait()`` reported as due. Timers are named deadlines on the
loop's clock, set and cleared by name; one that is due is reported once and
removed, so the owner re-arms what repeats.

Signals are caught by handlers that only record the number; the C-level wake-up
fd (``signal.set_wakeup_fd``) on the loop's self-pipe makes ``poll`` return, and
the callbacks run from ``wait()``, outside signal context. ``PollSelector``
keeps no kernel-side registrations, so an fd number reused after a reconnect
is safe to register again.

Each return of ``wait()`` counts one wake-up per source that made it return
(an fd's group, a timer's name, "signal", "wake"): a daemon shows these to say
what keeps it busy.
"""

from __future__ import annotations

import selectors
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable

FdCallback = Callable[[int], None]


class Loop:
    """A poll selector, a table of named timers and a self-pipe for signals."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._selector = selectors.PollSelector()
        self._groups: dict[str, dict[int, FdCallback]] = {}  # group -> fd -> callback
        self._timers: dict[str, float] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r.fileno(), selectors.EVENT_READ, ("wake", None))
        self._pending_signals: list[int] = []
        self._signal_callbacks: dict[int, Callable[[int], None]] = {}
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup: int | None = None
        self.wakeups: Counter[str] = Counter()

    # -- fds ------------------------------------------------------------------

    def follow(self, group: str, fds: Iterable[int | None], callback: FdCallback) -> None:
        """Watch exactly these fds under ``group`` (None entries are skipped): fds that
        left the set are no longer polled, new ones are; ``callback(fd)`` runs when one
        is readable."""
        wanted = {fd for fd in fds if fd is not None}
        current = self._groups.setdefault(group, {})
        for fd in [fd for fd in current if fd not in wanted]:
            self._selector.unregister(fd)
            del current[fd]
        for fd in wanted:
            if fd not in current:
                self._selector.register(fd, selectors.EVENT_READ, (group, fd))
            current[fd] = callback

    def watch(self, group: str, fd: int | None, callback: FdCallback) -> None:
        """Watch one fd (or none) under ``group``, replacing what the group held."""
        self.follow(group, (fd,), callback)

    def forget(self, group: str) -> None:
        self.follow(group, (), lambda fd: None)

    def watched(self, group: str) -> frozenset[int]:
        return frozenset(self._groups.get(group, ()))

    # -- timers ---------------------------------------------------------------

    def at(self, name: str, when: float | None) -> None:
        """Set the timer ``name`` to fire at ``when`` (the loop's clock); None clears it."""
        if when is None:
            self._timers.pop(name, None)
        else:
            self._timers[name] = when

    def due(self, name: str) -> float | None:
        return self._timers.get(name)

    def next_deadline(self) -> float | None:
        return min(self._timers.values(), default=None)

    def expired(self, now: float) -> frozenset[str]:
        """The timers due at ``now``; they are removed."""
        fired = frozenset(name for name, when in self._timers.items() if when <= now)
        for name in fired:
            del self._timers[name]
        return fired

    # -- signals and wake-ups -------------------------------------------------

    def catch(self, signals: Iterable[int], callback: Callable[[int], None]) -> None:
        """Run ``callback(signum)`` from ``wait()`` when one of these signals arrives.
        Main thread only (Python's rule for signal handlers); ``close()`` restores."""
        if self._old_wakeup is None:
            self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(),
                                                    warn_on_full_buffer=False)
        for signum in signals:
            self._signal_callbacks[signum] = callback
            if signum not in self._old_handlers:
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._pending_signals.append(signum)

    def wake(self) -> None:
        """Make the current or next ``wait()`` return at once (safe from other threads)."""
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # already full: a wake-up is pending anyway

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    # -- waiting --------------------------------------------------------------

    def wait(self, limit: float | None = None) -> frozenset[str]:
        """Sleep until something happens (at most ``limit`` seconds, if given); run the
        callbacks of readable fds and caught signals; return the timers now due."""
        now = self.clock()
        deadline = self.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - now)
        if limit is not None:
            timeout = limit if timeout is None else min(timeout, limit)
        if not self._pending_signals:
            ready = self._selector.select(timeout)
        else:
            ready = self._selector.select(0)
        sources: set[str] = set()
        for key, _ in ready:
            group, fd = key.data
            sources.add(group)
            if group == "wake":
                self._drain_wake()
                continue
            callback = self._groups.get(group, {}).get(fd)
            if callback is not None:  # an earlier callback may have dropped it
                callback(fd)
        if self._pending_signals:
            sources.discard("wake")  # the signal's byte on the self-pipe
            sources.add("signal")
            pending, self._pending_signals = self._pending_signals, []
            for signum in pending:
                callback = self._signal_callbacks.get(signum)
                if callback is not None:
                    callback(signum)
        fired = self.expired(self.clock())
        sources |= {f"timer:{name}" for name in fired}
        self.wakeups.update(sources)
        return fired

    # -- the end --------------------------------------------------------------

    def close(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            self._old_wakeup = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

