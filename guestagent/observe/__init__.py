"""Observation of the guest: threads, IRQs and vCPUs, as immutable snapshots.

The only package that reads the kernel (through ``kernel.py``). The daemon
drives an ``Observer`` from its own event loop: it polls ``fds()``, calls
``handle_readable(fd)`` when one is readable, and ``snapshot(now)`` when it
wants a fresh picture. Nothing here starts threads or sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass

from guestagent.observe.cpus import CpuState, CpuTable, with_lowprio_threads
from guestagent.observe.irqs import IrqInfo, IrqTable
from guestagent.observe.kernel import Kernel, LiveKernel, RecordedKernel
from guestagent.observe.pinned import pinned_critical
from guestagent.observe.threads import (
    Interest,
    ThreadIdentity,
    ThreadInfo,
    ThreadTable,
    take_new_notes,
)

__all__ = [
    "CpuState", "IrqInfo", "Kernel", "LiveKernel", "Observer", "RecordedKernel", "Snapshot",
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
    """

    def __init__(self, kernel: Kernel | None = None,
                 interest: Interest | None = None, watch: bool = True) -> None:
        self.kernel = kernel if kernel is not None else LiveKernel()
        self._threads = ThreadTable(self.kernel, interest, watch=watch)
        self._irqs = IrqTable(self.kernel)
        try:
            self._cpus = CpuTable(self.kernel, watch=watch)
        except BaseException:
            self._threads.close()
            raise
        self._said: set = set()
        self._lowprio_ticks: dict[int, int] = {}  # tid -> cpu ticks at the last snapshot
        self._last_at: float | None = None

    @property
    def thread_mode(self) -> str:
        """'events' (proc connector) or 'rescan' (directory reconciliation)."""
        return self._threads.mode

    def fds(self) -> list[int]:
        """Readable fds to poll: the proc connector and the udev monitor, when present."""
        return [fd for fd in (self._threads.fileno(), self._cpus.fileno()) if fd is not None]

    def handle_readable(self, fd: int) -> None:
        """Consume what is queued on ``fd``; never blocks."""
        if fd == self._threads.fileno():
            self._threads.handle_readable()
        elif fd == self._cpus.fileno():
            self._cpus.handle_readable()

    def set_interest(self, interest: Interest | None) -> None:
        """Replace the interest predicate (config reload); applied at the next snapshot."""
        self._threads.set_interest(interest)

    def snapshot(self, now: float) -> Snapshot:
        threads, thread_notes = self._threads.sweep()
        irqs, irq_notes = self._irqs.sweep(now, threads)
        cpus, cpu_notes = self._cpus.sweep(now)
        if self._last_at is not None:
            cpus = with_lowprio_threads(cpus, threads, self._lowprio_ticks,
                                        now - self._last_at, self.kernel.clock_ticks())
        self._lowprio_ticks = {t.tid: t.cpu_ticks for t in threads if t.is_lowprio}
        self._last_at = now
        notes = thread_notes + take_new_notes(irq_notes + cpu_notes, self._said)
        return Snapshot(now, threads, len(self._threads), irqs, cpus, notes)

    def close(self) -> None:
        self._threads.close()
        self._cpus.close()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
