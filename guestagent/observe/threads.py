"""The thread table: every thread's scheduling state, kept current cheaply.

The set of threads follows the proc connector's fork/exec/comm/exit events
(or, where that is unavailable, a rescan of /proc each sweep). A sweep asks the
scheduler for every known thread's policy and nice with one syscall each, and
reads /proc text only for the threads that matter: a policy other than OTHER,
a nice other than 0, or chosen by the ``interest`` predicate.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Callable

from guestagent.observe.events import ProcEvent
from guestagent.observe.kernel import SCHED_DEADLINE, Kernel, ProcEventSource
from guestagent.observe.parse import (
    PF_KTHREAD,
    PF_NO_SETAFFINITY,
    ParseError,
    decode_comm,
    irq_thread_number,
    parse_cgroup,
    parse_stat,
    systemd_unit,
)
from guestagent.protocol.model import SchedClass

RT_CLASSES = frozenset({SchedClass.FIFO, SchedClass.RR, SchedClass.DEADLINE})


@dataclass(frozen=True)
class ThreadInfo:
    """One thread as the scheduler sees it."""

    tid: int
    tgid: int
    comm: str
    policy: SchedClass
    rt_priority: int
    nice: int
    dl_runtime: int  # ns; DEADLINE only, else 0
    dl_deadline: int
    dl_period: int
    affinity: frozenset[int]
    last_cpu: int
    state: str
    cgroup: str  # "" if unread
    exe: str  # "" if unread or a kernel thread
    flags: int = 0  # PF_* flags from stat
    cpu_ticks: int = 0  # utime + stime, clock ticks

    @property
    def is_lowprio(self) -> bool:
        """Work that should not make its vCPU compete with host work."""
        return self.policy in (SchedClass.BATCH, SchedClass.IDLE) or self.nice > 0

    @property
    def is_rt(self) -> bool:
        return self.policy in RT_CLASSES

    @property
    def is_kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def is_percpu_kthread(self) -> bool:
        """A kernel thread bound to its CPU by the kernel (migration/N, ktimers/N...)."""
        return bool(self.flags & PF_KTHREAD) and bool(self.flags & PF_NO_SETAFFINITY)

    @property
    def unit(self) -> str:
        return systemd_unit(self.cgroup)


@dataclass(frozen=True)
class ThreadIdentity:
    """What config rules match on; read once per process (exe, cgroup) and per comm change."""

    tid: int
    tgid: int
    comm: str
    exe: str
    cgroup: str

    @property
    def unit(self) -> str:
        return systemd_unit(self.cgroup)


Interest = Callable[[ThreadIdentity], bool]


def to_sched_class(policy: int) -> SchedClass | None:
    try:
        return SchedClass(policy)
    except ValueError:
        return None


class _Known:
    """A thread the table tracks between sweeps (mutable, private)."""

    __slots__ = ("tgid", "comm")

    def __init__(self, tgid: int, comm: str | None) -> None:
        self.tgid = tgid
        self.comm = comm  # None until someone needs it


class ThreadTable:
    """All threads of the machine; ``sweep()`` returns those that matter."""

    def __init__(self, kernel: Kernel, interest: Interest | None = None,
                 watch: bool = True) -> None:
        self._kernel = kernel
        self._interest = interest
        self._known: dict[int, _Known] = {}
        self._identity: dict[int, tuple[str, str]] = {}  # tgid -> (exe, cgroup)
        self._pending: set[int] = set()  # interest to (re-)evaluate
        self._interested: set[int] = set()
        self._notes: list[tuple[str, str]] = []  # (key, line) for the next sweep
        self._said: set[str] = set()  # keys already reported: a condition is said once
        self._needs_rescan = True
        self.events: ProcEventSource | None = None
        self.mode = "rescan"
        if watch:
            try:
                self.events = kernel.proc_events()
                self.mode = "events"
            except Exception as err:  # pyroute2/netlink raise various types; all mean "no"
                why = getattr(err, "strerror", None) or str(err) or type(err).__name__
                self._note("connector", f"process events unavailable ({why}): "
                           "finding threads by rescanning /proc each sweep")

    # -- events ---------------------------------------------------------------

    def fileno(self) -> int | None:
        return self.events.fileno() if self.events else None

    def handle_readable(self) -> None:
        if not self.events:
            return
        try:
            events, lost = self.events.read()
        except OSError as err:
            self._note("connector-read", f"process events read failed ({err.strerror}): "
                       "rescanning /proc")
            self._needs_rescan = True
            return
        if lost:
            self._note("!overrun", "process events overflowed the socket buffer: rescanning /proc")
            self._needs_rescan = True
        self.apply(events)

    def apply(self, events: list[ProcEvent]) -> None:
        """Update the set of threads from connector events (in kernel order)."""
        known = self._known
        for ev in events:
            if ev.kind == "fork":
                parent = known.get(ev.parent_tid)
                known[ev.tid] = _Known(ev.tgid, parent.comm if parent else None)
                self._pending.add(ev.tid)
            elif ev.kind == "exit":
                known.pop(ev.tid, None)
                self._pending.discard(ev.tid)
                self._interested.discard(ev.tid)
                if ev.tid == ev.tgid:
                    self._identity.pop(ev.tgid, None)
            elif ev.kind == "exec":
                known[ev.tid] = _Known(ev.tgid, None)
                self._identity.pop(ev.tgid, None)
                self._pending.add(ev.tid)
            elif ev.kind == "comm":
                entry = known.get(ev.tid)
                if entry is None:
                    known[ev.tid] = entry = _Known(ev.tgid, None)
                entry.comm = ev.comm
                self._pending.add(ev.tid)

    # -- interest -------------------------------------------------------------

    def set_interest(self, interest: Interest | None) -> None:
        self._interest = interest
        self._interested.clear()
        self._pending = set(self._known)

    def _evaluate_pending(self) -> None:
        pending, self._pending = self._pending, set()
        for tid in pending:
            entry = self._known.get(tid)
            if entry is None:
                continue
            if self._interest is None:
                self._interested.discard(tid)
                continue
            ident = self._identify(tid, entry)
            if ident is None:
                continue
            try:
                wanted = bool(self._interest(ident))
            except Exception as err:  # a rule must not take the observer down
                self._note("interest", f"interest rule failed ({type(err).__name__}: {err}); "
                           "treating threads it fails on as not of interest")
                wanted = False
            if wanted:
                self._interested.add(tid)
            else:
                self._interested.discard(tid)

    def _identify(self, tid: int, entry: _Known) -> ThreadIdentity | None:
        if entry.comm is None:
            try:
                entry.comm = decode_comm(self._kernel.comm(entry.tgid, tid))
            except OSError as err:
                if _gone(err):
                    self._forget(tid)
                    return None
                entry.comm = ""
        exe, cgroup = self._process_identity(entry.tgid)
        return ThreadIdentity(tid, entry.tgid, entry.comm, exe, cgroup)

    def _process_identity(self, tgid: int) -> tuple[str, str]:
        cached = self._identity.get(tgid)
        if cached is None:
            cached = (self._read_exe(tgid), self._read_cgroup(f"/proc/{tgid}/cgroup"))
            self._identity[tgid] = cached
        return cached

    def _read_exe(self, tgid: int) -> str:
        try:
            return self._kernel.readlink(f"/proc/{tgid}/exe")
        except PermissionError:
            self._note("exe-perm", "executable paths of some processes are unreadable "
                       "(permission denied): shown empty")
        except OSError:
            pass  # kernel threads have no exe; a process that left has none either
        return ""

    def _read_cgroup(self, path: str) -> str:
        try:
            return parse_cgroup(self._kernel.read_text(path))
        except PermissionError:
            self._note("cgroup-perm", "cgroup paths unreadable (permission denied): shown empty")
        except OSError:
            pass
        return ""

    # -- rescan / sweep -------------------------------------------------------

    def rescan(self) -> None:
        """Reconcile the set of threads with the /proc directory tree."""
        try:
            seen = self._kernel.thread_ids()
        except OSError as err:
            self._note("rescan", f"cannot list /proc ({err.strerror}): thread table may be stale")
            return
        live = {tid for _, tid in seen}
        for tid in [t for t in self._known if t not in live]:
            self._forget(tid)
        for tgid, tid in seen:
            entry = self._known.get(tid)
            if entry is None or entry.tgid != tgid:
                self._known[tid] = _Known(tgid, None)
                self._pending.add(tid)
        self._needs_rescan = self.events is None

    def _forget(self, tid: int) -> None:
        self._known.pop(tid, None)
        self._pending.discard(tid)
        self._interested.discard(tid)

    def __len__(self) -> int:
        return len(self._known)

    def sweep(self) -> tuple[tuple[ThreadInfo, ...], tuple[str, ...]]:
        """Re-read every thread's policy and nice; detail only for threads that matter.

        Returns (threads that matter sorted by tid, notes not said before).
        """
        if self._needs_rescan:
            self.rescan()
        if self._pending:
            self._evaluate_pending()
        tids = list(self._known)
        policies = self._kernel.policies(tids)
        nices = self._kernel.nices(tids)
        interested = self._interested
        # policy OTHER is 0, nice 0 is 0, GONE is -1: a truthiness test picks both
        # "matters" and "exited" in one C-speed pass over the batch
        matter = [t for t, p, n in zip(tids, policies, nices) if p or n or t in interested] \
            if interested else [t for t, p, n in zip(tids, policies, nices) if p or n]
        out: list[ThreadInfo] = []
        unknown_policies: set[int] = set()
        for tid in matter:
            info = self._detail(tid, unknown_policies)
            if info is not None:
                out.append(info)
        if unknown_policies:
            self._note("policy-unknown", "scheduling policy "
                       f"{', '.join(map(str, sorted(unknown_policies)))} not known to this "
                       "version: shown as OTHER")
        out.sort(key=lambda t: t.tid)
        return tuple(out), self._take_notes()

    def _detail(self, tid: int, unknown_policies: set[int]) -> ThreadInfo | None:
        entry = self._known.get(tid)
        if entry is None:
            return None
        kernel, tgid = self._kernel, entry.tgid
        try:
            # one stat read gives policy, priority, nice, state and CPU at a single
            # instant; the syscall pass already chose this thread, so no need to re-ask
            stat = parse_stat(kernel.stat(tgid, tid))
            affinity = kernel.affinity(tgid, tid)
            dl = kernel.deadline(tgid, tid) if stat.policy == SCHED_DEADLINE else (0, 0, 0)
        except OSError as err:
            if _gone(err):
                self._forget(tid)
            else:
                self._note(f"detail-{err.errno}", f"some threads' scheduling details are "
                           f"unreadable ({err.strerror}): left out")
            return None
        except ParseError as err:
            self._note("stat-parse", f"malformed /proc stat skipped ({err})")
            return None
        if entry.comm != stat.comm:
            entry.comm = stat.comm
            if self._interest is not None:
                self._pending.add(tid)
        policy = to_sched_class(stat.policy)
        if policy is None:
            unknown_policies.add(stat.policy)
            policy = SchedClass.OTHER
        exe, cgroup = self._process_identity(tgid)
        return ThreadInfo(
            tid=tid, tgid=tgid, comm=stat.comm, policy=policy,
            rt_priority=stat.rt_priority, nice=stat.nice,
            dl_runtime=dl[0], dl_deadline=dl[1], dl_period=dl[2], affinity=affinity,
            last_cpu=stat.last_cpu, state=stat.state, cgroup=cgroup, exe=exe,
            flags=stat.flags, cpu_ticks=stat.cpu_ticks,
        )

    # -- notes ----------------------------------------------------------------

    def _note(self, key: str, line: str) -> None:
        self._notes.append((key, line))

    def _take_notes(self) -> tuple[str, ...]:
        notes, self._notes = self._notes, []
        return take_new_notes(notes, self._said)

    def close(self) -> None:
        if self.events:
            self.events.close()
            self.events = None


def take_new_notes(notes: list[tuple[str, str]], said: set[str]) -> tuple[str, ...]:
    """Lines whose key was not reported before (keys starting with '!' always repeat)."""
    out: list[str] = []
    for key, line in notes:
        if key in said:
            continue
        if not key.startswith("!"):
            said.add(key)
        if line not in out:
            out.append(line)
    return tuple(out)


def _gone(err: OSError) -> bool:
    return err.errno in (errno.ESRCH, errno.ENOENT)


def irq_threads_by_number(threads) -> dict[int, tuple[ThreadInfo, ...]]:
    """Threaded-IRQ kthreads grouped by their IRQ number."""
    out: dict[int, list[ThreadInfo]] = {}
    for t in threads:
        n = irq_thread_number(t.comm)
        if n is not None and t.is_kthread:
            out.setdefault(n, []).append(t)
    return {n: tuple(ts) for n, ts in out.items()}
