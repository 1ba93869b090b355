"""Observation of the guest: threads, IRQs and vCPUs, as immutable snapshots.

The only package that reads the guest's scheduling state from the kernel
(through ``kernel.py``; the /proc formats it parses are guestagent.linux.procfs,
which the host side shares). The daemon
drives an ``Observer`` from its own event loop: it polls ``fds()``, calls
``handle_readable(fd)`` when one is readable, and ``snapshot(now)`` when it
wants a fresh picture. Nothing here starts threads or sleeps.

Cheap and frequent versus complete and rarer: ``snapshot(now, full=False)``
sweeps the threads (see ``threads.py`` for what it verifies rather than
re-reads) and reuses the IRQ and CPU tables of the last full snapshot, with
each IRQ's threads taken from the fresh sweep; ``full=True`` (the default)
re-reads everything. The daemon takes a full one about once a second.

Changes between sweeps: after each round of ``handle_readable`` the loop calls
``refresh(now)``, which re-reads only the threads that changed and returns a
snapshot when one of them did: threads named by a scheduler-change wake-up
(``schedwatch.py``: some thread's policy, priority, nice or affinity was just
set), young threads found real-time (see below), and threads that mattered and
exited (their exit event). The loop also waits for ``deadline()`` and then
calls ``check_changes(now)``: it asks the young threads that are due for their
policy (newborns; with scheduler-change wake-ups once, when the fork event is
read, else a few times in their first ~150 ms), and returns True, meaning take
a sweep now, only for a wake-up that names no threads (or too many). Those
sweeps are paced by a token bucket, so a storm of them cannot make the agent
spin.

Batched process events: other work's forks and exits would wake the agent a few
dozen times a second for nothing. When scheduler-change wake-ups work (with
real-time births among them) and every thread whose exit matters has a pidfd of
its own (``threads.py``), a read of the connector closes it for ``EVENT_BATCH``:
what queues meanwhile is read by the next sweep, which starts a new batch, or
when the batch ends (``deadline()``) if no sweep came first, or at once when a
scheduler change names a thread the table cannot place (``ThreadTable.adopt``:
a thread that set its own scheduling is placed in the process the change names;
a thread born real-time, in the one its fork event names). A watched thread's
exit needs no read: its pidfd names it. What waits for the batch is what the
connector alone reports: the births and exits of threads that do not matter,
and a new name or image for config rules, which sweeps apply anyway.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from guestagent.observe.cpus import CpuState, CpuTable, with_lowprio_threads
from guestagent.observe.irqs import IrqInfo, IrqTable, with_irq_threads
from guestagent.observe.kernel import Kernel, LiveKernel, RecordedKernel
from guestagent.observe.pinned import pinned_critical
from guestagent.observe.schedwatch import SchedWatch
from guestagent.observe.threads import (
    Interest,
    ThreadIdentity,
    ThreadInfo,
    ThreadTable,
    take_new_notes,
)
from guestagent.observe.young import WATCHED_YOUNG_CHECKS

# Extra snapshots that changes trigger cost at most this share of one CPU on
# average (a token bucket that holds CHANGE_SWEEP_BURST snapshots), so a lone
# change is shown at once but a storm of them cannot make the agent spin.
CHANGE_SWEEP_SHARE = 0.05
CHANGE_SWEEP_BURST = 4
MAX_TARGETS = 512  # more threads changed at once than this: a sweep is cheaper
EVENT_BATCH = 1.0  # s: process events of other work are read at most this often
COST_SMOOTHING = 0.25  # weight of the newest snapshot in the average cost

__all__ = [
    "EVENT_BATCH", "CpuState", "IrqInfo", "Kernel", "LiveKernel", "Observer", "RecordedKernel",
    "Snapshot",
    "ThreadIdentity", "ThreadInfo", "ThreadTable", "pinned_critical",
]


@dataclass(frozen=True)
class Snapshot:
    """The guest's scheduling state at one moment."""

    taken_at: float  # the caller's monotonic clock
    threads: tuple[ThreadInfo, ...]  # only threads that matter (policy, nice or interest)
    nr_threads: int  # all threads known
    irqs: tuple[IrqInfo, ...]
    cpus: CpuState
    notes: tuple[str, ...]  # one line each: what could not be read and why (said once)


class Observer:
    """Keeps the thread, IRQ and CPU tables current; ``snapshot()`` sweeps.

    ``watch=False`` skips the event sources (one-shot CLI views): the threads
    are then found by scanning /proc at each snapshot, without a note.
    ``paths=False`` leaves executable paths unread (and unreported when they
    cannot be read) unless an interest predicate needs them: for views that
    show none.
    """

    def __init__(self, kernel: Kernel | None = None,
                 interest: Interest | None = None, watch: bool = True,
                 change_share: float = CHANGE_SWEEP_SHARE, paths: bool = True) -> None:
        self.kernel = kernel if kernel is not None else LiveKernel()
        self._watching = watch
        self._sched_watch: SchedWatch | None = None
        self.change_share = change_share
        self._threads = ThreadTable(self.kernel, interest, watch=watch, paths=paths)
        self._irqs = IrqTable(self.kernel)
        try:
            self._cpus = CpuTable(self.kernel, watch=watch)
        except BaseException:
            self._threads.close()
            raise
        self._said: set = set()
        self._lowprio_ticks: dict[int, int] = {}  # tid -> cpu ticks at the last full snapshot
        self._own_tgid = os.getpid()  # our own run time is not the vCPUs' workload
        self._last_full: Snapshot | None = None
        self._irqs_now: tuple[IrqInfo, ...] = ()  # the IRQ table of the latest snapshot
        self._cost = 0.0  # smoothed CPU time of one snapshot, s
        self._last_cost = 0.0  # CPU time of the newest snapshot, s
        self._changed = False  # a change is waiting for its snapshot (held back by the bucket)
        self._targets: set[int] = set()  # threads whose scheduling was just set
        self._owners: dict[int, int] = {}  # tid -> tgid of targets that set their own
        self._change_credit = 0.0  # CPU seconds change-triggered snapshots may still spend
        self._credit_at: float | None = None
        self._events_gate: float | None = None  # connector not polled until then (batching)
        self._fd_key: tuple | None = None  # what fds_by_source() was last built from
        self._fds_by_source: dict[str, list[int]] = {}
        self._fd_list: list[int] = []

    @property
    def cost(self) -> float:
        """Smoothed CPU time of one snapshot, in seconds (0 before the first)."""
        return self._cost

    @property
    def last_cost(self) -> float:
        """CPU time of the newest snapshot, in seconds (0 before the first)."""
        return self._last_cost

    @property
    def changes_watched(self) -> bool:
        """True when scheduler-change wake-ups work, so sweeps are only a backstop."""
        return self._sched_watch is not None

    @property
    def thread_mode(self) -> str:
        """'events' (proc connector) or 'rescan' (directory reconciliation)."""
        return self._threads.mode

    def fds(self) -> list[int]:
        """Readable fds to poll: the proc connector, the udev monitor, the scheduler
        watch and the exit watches, when present. The set changes after snapshots (CPU
        hotplug, threads that matter) and while process events are batched; until it
        does, the same list (not to be modified) is returned."""
        self.fds_by_source()
        return self._fd_list

    def fds_by_source(self) -> dict[str, list[int]]:
        """The same fds by what they report, for a loop that counts its wake-ups so;
        the same dict (not to be modified) until the set changes, so that a loop
        called at every turn re-registers nothing while nothing changed."""
        events = self._threads.fileno()
        key = (events if self._events_gate is None else None, self._cpus.fileno(),
               self._sched_watch, self._threads.exit_fds_version)
        if key != self._fd_key:
            self._fd_key = key
            self._fds_by_source = {
                "events": [] if key[0] is None else [key[0]],
                "cpus": [] if key[1] is None else [key[1]],
                "sched": self._sched_watch.fds() if self._sched_watch else [],
                "exits": self._threads.exit_fds()}
            self._fd_list = [fd for fds in self._fds_by_source.values() for fd in fds]
        return self._fds_by_source

    @property
    def events_fd(self) -> int | None:
        """The proc connector's fd (polled through ``fds()`` unless a batch is open)."""
        return self._threads.fileno()

    @property
    def batching(self) -> bool:
        """Whether process events are read in batches (see the module docstring)."""
        return self._sched_watch is not None and self._sched_watch.newborns and \
            self._threads.exits_watched

    def handle_readable(self, fd: int) -> None:
        """Consume what is queued on ``fd``; never blocks."""
        if fd == self._threads.fileno():
            self._threads.handle_readable()
            if self.batching:
                self._events_gate = time.monotonic() + EVENT_BATCH
        elif self._threads.watches_exit(fd):
            self._threads.exit_seen(fd)
        elif fd == self._cpus.fileno():
            self._cpus.handle_readable()
        elif self._sched_watch is not None and fd in self._sched_watch.fds():
            changes = self._sched_watch.read()
            self._targets |= changes.tids
            self._owners.update(changes.owners)
            if changes.everything or len(self._targets) > MAX_TARGETS:
                self._changed = True
                self._targets.clear()
                self._owners.clear()

    def refresh(self, now: float) -> Snapshot | None:
        """A snapshot with just the threads whose scheduling was set (or young threads
        that turned real-time) re-read, when any of them changed or a thread that
        mattered exited; None otherwise. Costs microseconds per thread, so it needs
        no pacing: call it after every round of ``handle_readable``."""
        last = self._last_full
        if last is None or not (self._targets or self._threads.has_news()):
            return None
        if self._targets and self._threads.fileno() is not None and \
                not self._threads.adopt(self._targets, self._owners):
            self._threads.handle_readable()  # a thread born just now must be known first
        refreshed = self._threads.refresh(self._targets)
        self._targets.clear()
        self._owners.clear()
        if refreshed is None:
            return None
        threads, kthreads = refreshed
        if kthreads:  # else every IRQ's threads are those of the latest snapshot
            self._irqs_now = with_irq_threads(last.irqs, threads)
        return Snapshot(now, threads, len(self._threads), self._irqs_now, last.cpus, ())

    def _follow_cpus(self, online: frozenset[int]) -> list[str]:
        """Open the scheduler watch, or reopen it for a new set of online CPUs."""
        if not self._watching or (self._sched_watch and self._sched_watch.cpus == online):
            return []
        if self._sched_watch is not None:
            self._sched_watch.close()
            self._sched_watch = None
        try:
            self._sched_watch = self.kernel.sched_watch(online)
        except OSError as err:
            self._watching = False
            return [f"scheduler-change events unavailable ({err.strerror or err}): a policy "
                    "change of a running thread is seen at the next sweep"]
        self._threads.young.retime(WATCHED_YOUNG_CHECKS, 0.0)
        return []

    def set_interest(self, interest: Interest | None) -> None:
        """Replace the interest predicate (config reload); applied at the next snapshot."""
        self._threads.set_interest(interest)

    def deadline(self) -> float | None:
        """When ``check_changes`` is next due (``time.monotonic()`` clock), or None."""
        due = self._threads.young_deadline()
        if self._events_gate is not None:
            due = self._events_gate if due is None else min(due, self._events_gate)
        if self._changed:
            held = self._release()
            due = held if due is None else min(due, held)
        return due

    def check_changes(self, now: float) -> bool:
        """Re-check the young threads that are due; True: take a snapshot now.

        A young thread that became real-time is left for ``refresh`` to re-read,
        with no sweep. A scheduler-change wake-up that names no threads (or too
        many) asks for a sweep at once, unless the last snapshot was too recent
        for the change share; then it is held and ``deadline()`` says when to
        come back.
        """
        if self._events_gate is not None and now >= self._events_gate:
            self._read_batch(now)
            now = max(now, time.monotonic())  # newborns just read are due for their look
        self._targets.update(self._threads.check_young(now))
        if self._changed and now >= self._release():
            self._changed = False
            self._change_credit = self._credit(now) - self._cost
            self._credit_at = now
            return True
        return False

    def _read_batch(self, now: float) -> None:
        """Read the batched events; keep batching while other work keeps forking."""
        read = self._threads.handle_readable()
        self._events_gate = now + EVENT_BATCH if read and self.batching else None

    def _credit(self, now: float) -> float:
        if self._credit_at is None:
            return CHANGE_SWEEP_BURST * self._cost
        return min(CHANGE_SWEEP_BURST * self._cost,
                   self._change_credit + self.change_share * max(0.0, now - self._credit_at))

    def _release(self) -> float:
        """When the bucket holds one snapshot's cost again."""
        if self._credit_at is None or self._change_credit >= self._cost:
            return float("-inf")
        return self._credit_at + (self._cost - self._change_credit) / self.change_share

    def snapshot(self, now: float, full: bool = True) -> Snapshot:
        """Sweep; ``full=False`` reuses the IRQ and CPU tables of the last full snapshot."""
        started = time.thread_time()
        last = self._last_full
        full = full or last is None
        if self._events_gate is not None:
            self._read_batch(now)  # the sweep knows every thread born so far
        threads, thread_notes = self._threads.sweep(full)
        if full:
            irqs, irq_notes = self._irqs.sweep(now, threads)
            cpus, cpu_notes = self._cpus.sweep(now)
            cpu_notes = cpu_notes + [("sched-watch", line)
                                     for line in self._follow_cpus(cpus.online)]
            if last is not None:
                cpus = with_lowprio_threads(cpus, threads, self._lowprio_ticks,
                                            now - last.taken_at, self.kernel.clock_ticks(),
                                            own_tgid=self._own_tgid)
            self._lowprio_ticks = {t.tid: t.cpu_ticks for t in threads
                                   if t.is_lowprio or t.tgid == self._own_tgid}
            notes = thread_notes + take_new_notes(irq_notes + cpu_notes, self._said)
        else:
            assert last is not None
            irqs, cpus, notes = with_irq_threads(last.irqs, threads), last.cpus, thread_notes
        snap = Snapshot(now, threads, len(self._threads), irqs, cpus, notes)
        self._irqs_now = irqs
        if full:
            self._last_full = snap
        self._changed = False  # this snapshot shows them
        cost = self._last_cost = time.thread_time() - started
        self._cost = cost if self._cost == 0.0 else \
            COST_SMOOTHING * cost + (1 - COST_SMOOTHING) * self._cost
        return snap

    def close(self) -> None:
        self._threads.close()
        self._cpus.close()
        if self._sched_watch is not None:
            self._sched_watch.close()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
