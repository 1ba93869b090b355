"""The IO edge that changes vCPU threads: apply, read back, restore.

Originals are read for every vCPU thread at attach, before any change, and
every thread changed is put back on restore_all(). Before each change the
thread is checked to still be the same thread of the same QEMU process, and
before the first change of a thread its original is recorded in the VM's state
file (an UndoJournal), so a peer killed with SIGKILL can still be undone.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from guestagent.errors import GuestagentError
from guestagent.host.discovery import VcpuThread, thread_start_time
from guestagent.host.settings import ThreadSettings
from guestagent.host.undo import ProcessId
from guestagent.sched import POLICY_MASK, SCHED_RESET_ON_FORK

if TYPE_CHECKING:  # statefile imports this module for read/write_settings
    from guestagent.host.statefile import UndoJournal

Log = Callable[[str], None]


def read_settings(tid: int) -> ThreadSettings:
    return ThreadSettings(
        policy=os.sched_getscheduler(tid),
        rt_priority=os.sched_getparam(tid).sched_priority,
        nice=os.getpriority(os.PRIO_PROCESS, tid),
        affinity=frozenset(os.sched_getaffinity(tid)),
    )


def resetting_on_fork(original: ThreadSettings, settings: ThreadSettings) -> ThreadSettings:
    """`settings` with SCHED_RESET_ON_FORK when they make RT a thread that was not: a
    boosted QEMU thread (the main loop above all) creates threads, which must start at
    SCHED_OTHER rather than inherit a boost nobody takes back (and keep its RT cgroup
    busy). Otherwise the original's flag is kept: the operator's choice."""
    def bare(s: ThreadSettings) -> ThreadSettings:
        return replace(s, policy=s.policy & POLICY_MASK)

    if bare(settings) == bare(original):
        return original
    flag = (SCHED_RESET_ON_FORK if settings.is_rt and not original.is_rt
            else original.policy & SCHED_RESET_ON_FORK)
    return replace(settings, policy=(settings.policy & POLICY_MASK) | flag)


def write_settings(tid: int, old: ThreadSettings, new: ThreadSettings) -> None:
    """Make only the syscalls whose field changes."""
    if new.affinity != old.affinity:
        os.sched_setaffinity(tid, new.affinity)
    if (new.policy, new.rt_priority) != (old.policy, old.rt_priority):
        os.sched_setscheduler(tid, new.policy, os.sched_param(new.rt_priority))
    if new.nice != old.nice:
        os.setpriority(os.PRIO_PROCESS, tid, new.nice)


class ThreadApplier:
    """Owns the scheduler state of one VM's vCPU threads while the peer runs."""

    def __init__(self, pid: int, threads: Sequence[VcpuThread], dry_run: bool, log: Log,
                 journal: UndoJournal | None = None) -> None:
        self.pid = pid
        self.dry_run = dry_run
        self._log = log
        self._journal = journal
        self._threads: dict[int, VcpuThread] = {}
        self.originals: dict[int, ThreadSettings] = {}
        self.current: dict[int, ThreadSettings] = {}
        self.changed: set[int] = set()
        self.gone: set[int] = set()
        self.refused: Counter[int] = Counter()  # per thread: changes the kernel refused (EPERM)
        self.add(threads)

    def add(self, threads: Sequence[VcpuThread]) -> None:
        """Take on more threads (a hot-plugged vCPU), their originals read now, before
        any change; threads already held are left as they are."""
        new = [t for t in threads if t.vcpu not in self._threads]
        originals = {}
        for t in new:
            try:
                originals[t.vcpu] = read_settings(t.tid)
            except OSError as err:
                raise GuestagentError(
                    f"vCPU {t.vcpu} (tid {t.tid}): cannot read scheduler state: "
                    f"{err.strerror or err}") from None
        for t in new:
            self._threads[t.vcpu] = t
        self.originals.update(originals)
        self.current.update(originals)

    def tids(self) -> Mapping[int, int]:
        return {v: t.tid for v, t in self._threads.items() if v not in self.gone}

    def _alive(self, vcpu: int) -> bool:
        t = self._threads[vcpu]
        if vcpu not in self.gone and thread_start_time(self.pid, t.tid) != t.start_time:
            self.gone.add(vcpu)
            self.changed.discard(vcpu)
            self._log(f"vCPU {vcpu} (tid {t.tid}) is gone; leaving it alone")
        return vcpu not in self.gone

    def differs(self, vcpu: int, settings: ThreadSettings) -> bool:
        """Whether applying `settings` would change the thread (flags as apply() adds them)."""
        return resetting_on_fork(self.originals[vcpu], settings) != self.current[vcpu]

    def apply(self, vcpu: int, settings: ThreadSettings) -> ThreadSettings | None:
        """Apply and return the state read back, or None if the thread is gone or refused."""
        old = self.current[vcpu]
        settings = resetting_on_fork(self.originals[vcpu], settings)
        if settings == old:
            return old
        if not self._alive(vcpu):
            return None
        tid = self._threads[vcpu].tid
        if self.dry_run:
            self._log(f"dry run: vCPU {vcpu} (tid {tid}): would set {settings.describe()}")
            self.current[vcpu] = settings
            return settings
        if not self._recorded(vcpu):
            return None
        try:
            write_settings(tid, old, settings)
            self.changed.add(vcpu)
            got = read_settings(tid)
        except ProcessLookupError:
            self.gone.add(vcpu)
            self.changed.discard(vcpu)
            return None
        except OSError as err:
            if err.errno == errno.EPERM:
                self.refused[vcpu] += 1
            self._log(f"vCPU {vcpu} (tid {tid}): cannot set {settings.describe()}: "
                      f"{err.strerror or err}")
            try:
                got = read_settings(tid)
            except OSError:
                return None
            self.current[vcpu] = got
            return None
        # Compare what matters: the kernel may report the policy without flag bits.
        if replace(got, policy=got.policy & POLICY_MASK) != replace(
                settings, policy=settings.policy & POLICY_MASK):
            self._log(f"vCPU {vcpu} (tid {tid}): asked {settings.describe()}, "
                      f"kernel has {got.describe()}")
        self.current[vcpu] = got
        return got

    def _recorded(self, vcpu: int) -> bool:
        """The thread's original is on disk (or no journal is kept); never change it before."""
        if self._journal is None or vcpu in self._journal.recorded():
            return True
        t = self._threads[vcpu]
        try:
            self._journal.record_thread(vcpu, ProcessId(t.tid, t.start_time),
                                        self.originals[vcpu])
        except OSError as err:
            self._log(f"vCPU {vcpu} (tid {t.tid}): cannot record its original settings in "
                      f"{self._journal.path}: {err.strerror or err}; not changing it")
            return False
        return True

    def restore_all(self) -> None:
        """Put every thread this peer changed back as it was; quiet about vanished ones."""
        for vcpu in sorted(self.changed):
            original = self.originals[vcpu]
            if not self._alive(vcpu):
                continue
            tid = self._threads[vcpu].tid
            try:
                # Diff against the kernel, not our belief: restore must not skip a field.
                write_settings(tid, read_settings(tid), original)
                self.current[vcpu] = original
            except ProcessLookupError:
                self.gone.add(vcpu)
            except OSError as err:
                self._log(f"vCPU {vcpu} (tid {tid}): cannot restore {original.describe()}: "
                          f"{err.strerror or err}")
        self.changed = {v for v in self.changed if self.current[v] != self.originals[v]}
        if self._journal is not None and not self.changed:
            self._discard_journal()
        if self.dry_run:
            self.current = dict(self.originals)

    def _discard_journal(self) -> None:
        try:
            self._journal.discard()
        except OSError as err:  # harmless: restoring originals again changes nothing
            self._log(f"cannot remove {self._journal.path}: {err.strerror or err}")
