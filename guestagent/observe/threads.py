"""The thread table: every thread's scheduling state, kept current cheaply.

The set of threads follows the proc connector's fork/exec/comm/exit events
(or, where that is unavailable, a rescan of /proc each sweep).

What one sweep costs, per thread (the floor is one syscall per thread):

- every thread: one sched_getscheduler;
- nice: a rotating quarter of the threads, plus every thread new since the
  last sweep and every thread that matters. A nice change of a thread that does
  not matter yet is therefore seen within ``NICE_ROTATION`` (4) sweeps;
- threads that matter (a policy other than OTHER, a nice other than 0, or
  chosen by the ``interest`` predicate) also get detail, kept per thread:
  user-space RT and interest threads have their stat pread() through a kept
  fd every sweep (re-parsed, and affinity re-read, only when the line changed);
  the others (kernel threads such as kworker/*H at nice -20 or migration/N,
  and low-priority threads) are only verified with nice and rt-priority
  syscalls, and their stat is re-read when one of those changed.
  ``sweep(full=True)`` re-reads every detail. So between full sweeps the
  last_cpu, state and cpu_ticks of those others, and the affinity of a thread
  whose stat line has not changed, may be as old as the last full sweep.

Young threads (seen in a fork or exec event) are also asked for their policy a
few times shortly after birth (``check_young``), see ``young.py``.

Exits that change a decision: every user-space real-time thread, and every
thread the ``interest`` predicate chose, has a thread pidfd (``exit_fds``) that
turns readable the moment it exits. While all of them have one
(``exits_watched``), the owner may read the connector's events in batches,
knowing that no exit which matters waits for the batch.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import compress
from typing import Callable

from guestagent.observe.events import ProcEvent
from guestagent.observe.kernel import GONE, Kernel, ProcEventSource
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
from guestagent.observe.young import YoungThreads
from guestagent.protocol.model import SchedClass
from guestagent.sched import PRIORITY_POLICIES as _FIFO_RR
from guestagent.sched import RT_POLICIES as RT_CLASSES
from guestagent.sched import SCHED_DEADLINE

NICE_ROTATION = 4  # nice of threads that do not matter: a 1/4 slice per sweep
# Threads whose exit is watched by a pidfd of their own (see ``exits_watched``);
# more real-time or chosen threads than this, and every event is read at once.
MAX_EXIT_WATCH = 64


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
                 watch: bool = True, paths: bool = True) -> None:
        self._kernel = kernel
        self._interest = interest
        # executable paths are read when someone shows them or a rule matches on them
        self._paths = paths
        self._known: dict[int, _Known] = {}
        self._identity: dict[int, tuple[str, str]] = {}  # tgid -> (exe, cgroup)
        self._pending: set[int] = set()  # interest to (re-)evaluate
        self._interested: set[int] = set()
        self._notes: list[tuple[str, str]] = []  # (key, line) for the next sweep
        self._said: set[str] = set()  # keys already reported: a condition is said once
        self._needs_rescan = True
        self._stat = kernel.stat_reader()
        self._info: dict[int, ThreadInfo] = {}  # last detail of each thread that matters
        self._raw: dict[int, bytes] = {}  # the stat line behind _info
        self._niced: dict[int, int] = {}  # tid -> nice of threads last seen at nice != 0
        self._nice_unread: set[int] = set()  # new threads whose nice was never asked
        self._phase = 0  # which slice of the threads has its nice asked this sweep
        self.young = YoungThreads()
        self._dropped = False  # a thread that mattered left since the last look
        self._kthread_dropped = False  # ... and it was a kernel thread
        self._exit_fds: dict[int, int] = {}  # tid -> pidfd, see exit_fds()
        self._exit_tids: dict[int, int] = {}  # pidfd -> tid
        self._exit_watch = watch  # False once the kernel refused a thread pidfd
        self.exits_watched = False  # every thread whose exit matters has a pidfd
        self.exit_fds_version = 0  # changes whenever exit_fds() does
        self.events: ProcEventSource | None = None
        self.mode = "rescan"
        if watch:
            try:
                self.events = kernel.proc_events()
                self.mode = "events"
            except Exception as err:  # netlink and the connector raise various types; all mean "no"
                why = getattr(err, "strerror", None) or str(err) or type(err).__name__
                self._note("connector", f"process events unavailable ({why}): "
                           "finding threads by rescanning /proc each sweep")

    # -- events ---------------------------------------------------------------

    def fileno(self) -> int | None:
        return self.events.fileno() if self.events else None

    def handle_readable(self) -> int:
        """Read and apply the queued events; returns how many there were."""
        if not self.events:
            return 0
        try:
            events, lost = self.events.read()
        except OSError as err:
            self._note("connector-read", f"process events read failed ({err.strerror}): "
                       "rescanning /proc")
            self._needs_rescan = True
            return 0
        if lost:
            self._note("!overrun", "process events overflowed the socket buffer: rescanning /proc")
            self._needs_rescan = True
        self.apply(events)
        return len(events) + lost

    def adopt(self, tids: Iterable[int], owners: Mapping[int, int]) -> bool:
        """Take threads that just set their own scheduling (``owners``: tid -> tgid, from
        the syscall) into the table ahead of their fork events, which wait in the
        batch; True when every one of ``tids`` is then known with that process. False
        means the queued events must be read first: a thread named by another, or a
        tid whose known process differs (it was reused; the old exit is queued)."""
        known = self._known
        for tid in tids:
            tgid = owners.get(tid)
            entry = known.get(tid)
            if tgid is None or (entry is not None and entry.tgid != tgid):
                return False
            if entry is None:  # its fork event, read later, replaces this entry
                known[tid] = _Known(tgid, None)
                self._pending.add(tid)
                self._nice_unread.add(tid)
        return True

    # -- exits that matter ----------------------------------------------------

    def exit_fds(self) -> list[int]:
        """Pidfds to poll: one per thread whose exit changes what the agent decides."""
        return list(self._exit_tids)

    def watches_exit(self, fd: int) -> bool:
        return fd in self._exit_tids

    def exit_seen(self, fd: int) -> None:
        """A watched thread exited (its pidfd is readable): take it out now.

        Other work's events stay queued for the batch: this exit's own event
        comes with them and finds the thread gone already (a no-op), and a
        thread that reuses the tid is born after that event, in the same order."""
        tid = self._exit_tids.get(fd)
        if tid is not None:
            self._forget(tid)

    def _exit_matters(self, tid: int) -> bool:
        info = self._info.get(tid)
        return info is not None and not info.is_kthread and \
            (info.is_rt or tid in self._interested)

    def _watch_exits(self, tids: Iterable[int] | None = None) -> None:
        """Give each thread whose exit matters a pidfd and close those of the others:
        of every thread (after a sweep) or of just these (after a refresh)."""
        if not self._exit_watch:
            return
        if tids is None:
            for tid in [t for t in self._exit_fds if not self._exit_matters(t)]:
                self._unwatch_exit(tid)
            tids, self.exits_watched = self._info, True
        for tid in tids:
            if not self._exit_matters(tid):
                self._unwatch_exit(tid)
            elif tid not in self._exit_fds and not self._watch_exit(tid):
                return

    def _watch_exit(self, tid: int) -> bool:
        """Open tid's pidfd; False when no more can be watched (then events are read at
        once: ``exits_watched`` is False until a sweep finds room again)."""
        if len(self._exit_fds) >= MAX_EXIT_WATCH:
            self.exits_watched = False
            return False
        try:
            fd = self._kernel.exit_watch(tid)
        except OSError as err:
            if _gone(err):
                return True  # exited already: its event is on its way
            self._exit_watch = self.exits_watched = False  # (EINVAL: Linux < 6.9)
            for t in list(self._exit_fds):
                self._unwatch_exit(t)
            return False
        self._exit_fds[tid] = fd
        self._exit_tids[fd] = tid
        self.exit_fds_version += 1
        return True

    def _unwatch_exit(self, tid: int) -> None:
        fd = self._exit_fds.pop(tid, None)
        if fd is not None:
            del self._exit_tids[fd]
            self.exit_fds_version += 1
            os.close(fd)

    def apply(self, events: list[ProcEvent]) -> None:
        """Update the set of threads from connector events (in kernel order)."""
        known, young = self._known, self.young
        now = None
        for ev in events:
            if ev.kind == "fork":
                parent = known.get(ev.parent_tid)
                known[ev.tid] = _Known(ev.tgid, parent.comm if parent else None)
                self._pending.add(ev.tid)
                self._nice_unread.add(ev.tid)
                if ev.timestamp_ns:
                    young.add(ev.tid, ev.timestamp_ns / 1e9)
                else:
                    now = time.monotonic() if now is None else now
                    young.add(ev.tid, now)
            elif ev.kind == "exit":
                self._forget(ev.tid)
                if ev.tid == ev.tgid:
                    self._identity.pop(ev.tgid, None)
            elif ev.kind == "exec":
                self._forget(ev.tid)  # a new image: new identity, new detail
                known[ev.tid] = _Known(ev.tgid, None)
                self._identity.pop(ev.tgid, None)
                self._pending.add(ev.tid)
                self._nice_unread.add(ev.tid)
                now = time.monotonic() if now is None else now
                young.add(ev.tid, ev.timestamp_ns / 1e9 if ev.timestamp_ns else now)
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
            exe = self._read_exe(tgid) if self._paths or self._interest is not None else ""
            cached = (exe, self._read_cgroup(f"/proc/{tgid}/cgroup"))
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
                if entry is not None:
                    self._forget(tid)
                self._known[tid] = _Known(tgid, None)
                self._pending.add(tid)
                self._nice_unread.add(tid)
        self._needs_rescan = self.events is None

    def _forget(self, tid: int) -> None:
        self._known.pop(tid, None)
        self._pending.discard(tid)
        self._interested.discard(tid)
        self._nice_unread.discard(tid)
        self._niced.pop(tid, None)
        self._raw.pop(tid, None)
        info = self._info.pop(tid, None)
        if info is not None:
            self._dropped = True
            self._kthread_dropped = self._kthread_dropped or info.is_kthread
        self._stat.drop(tid)
        self._unwatch_exit(tid)

    def __len__(self) -> int:
        return len(self._known)

    def sweep(self, full: bool = True) -> tuple[tuple[ThreadInfo, ...], tuple[str, ...]]:
        """Re-read every thread's policy; detail only for threads that matter.

        ``full=False`` is the frequent path: see the module docstring for what
        it verifies instead of re-reading. Returns (threads that matter sorted
        by tid, notes not said before).
        """
        if self._needs_rescan:
            self.rescan()
        if self._pending:
            self._evaluate_pending()
        kernel = self._kernel
        tids = list(self._known)
        policies = kernel.policies(tids)
        # OTHER is 0 and GONE is -1: compress() keeps "not OTHER" and "exited" at C speed
        policy_of = dict(zip(compress(tids, policies), compress(policies, policies)))
        self._phase = (self._phase + 1) % NICE_ROTATION
        part = tids[self._phase::NICE_ROTATION]
        if self._nice_unread:
            part += [t for t in self._nice_unread if t in self._known]
            self._nice_unread.clear()
        nices = kernel.nices(part)
        self._niced.update(zip(compress(part, nices), compress(nices, nices)))
        # what mattered at the last sweep is looked at too, to see it stop mattering
        matter = policy_of.keys() | self._niced.keys() | self._interested | self._info.keys()
        unknown_policies: set[int] = set()
        verify: list[tuple[int, ThreadInfo]] = []
        for tid in matter:
            policy = policy_of.get(tid, 0)
            if policy == GONE:
                self._forget(tid)
                continue
            info = self._info.get(tid)
            if full or info is None or policy != info.policy or policy == SCHED_DEADLINE:
                self._read_detail(tid, unknown_policies, None)
            elif not info.is_kthread and (policy or tid in self._interested):
                self._read_detail(tid, unknown_policies, info)  # the workload: stay fresh
            else:
                verify.append((tid, info))
        if verify:
            self._verify(verify, unknown_policies)
        if unknown_policies:
            self._note("policy-unknown", "scheduling policy "
                       f"{', '.join(map(str, sorted(unknown_policies)))} not known to this "
                       "version: shown as OTHER")
        if full:
            self._stat.keep_only(self._info)
        self._watch_exits()
        self._dropped = self._kthread_dropped = False  # this sweep shows it
        return self._matter(), self._take_notes()

    def _matter(self) -> tuple[ThreadInfo, ...]:
        return tuple(map(self._info.__getitem__, sorted(self._info)))

    def refresh(self, tids: Iterable[int]) -> tuple[tuple[ThreadInfo, ...], bool] | None:
        """Re-read just these threads (their scheduling was just set).

        None when none of them changed and no thread that mattered left (its
        exit); else the threads that matter, as ``sweep`` returns them, and
        whether a kernel thread was among the changes (only those can be IRQ
        threads). Threads not in the table yet are left to the young re-checks
        and the next sweep.
        """
        unknown_policies: set[int] = set()
        changed = kthreads = False
        read = [tid for tid in tids if tid in self._known]
        for tid in read:
            before = self._info.get(tid)
            self._read_detail(tid, unknown_policies, None)
            after = self._info.get(tid)
            if after != before:
                changed = True
                kthreads = kthreads or any(t is not None and t.is_kthread
                                           for t in (before, after))
        self._watch_exits(read)
        changed, kthreads = changed or self._dropped, kthreads or self._kthread_dropped
        self._dropped = self._kthread_dropped = False
        return (self._matter(), kthreads) if changed else None

    def _verify(self, checks: list[tuple[int, ThreadInfo]], unknown_policies: set[int]) -> None:
        """Keep a detail whose nice and rt priority are unchanged; re-read it otherwise."""
        kernel = self._kernel
        nices = kernel.nices([tid for tid, _ in checks])
        rt = [(tid, info) for tid, info in checks if info.policy in _FIFO_RR]
        prios = dict(zip([tid for tid, _ in rt], kernel.rt_priorities([t for t, _ in rt])))
        for (tid, info), nice in zip(checks, nices):
            prio = prios.get(tid, info.rt_priority)
            if prio == GONE:
                self._forget(tid)
            elif nice != info.nice or prio != info.rt_priority:
                self._read_detail(tid, unknown_policies, None)
            elif not (nice or info.policy or tid in self._interested):
                self._drop_detail(tid)  # interest withdrawn

    def _drop_detail(self, tid: int) -> None:
        self._info.pop(tid, None)
        self._raw.pop(tid, None)
        self._niced.pop(tid, None)
        self._stat.drop(tid)

    def _read_detail(self, tid: int, unknown_policies: set[int],
                     cached: ThreadInfo | None) -> None:
        """Read a thread's stat into _info (or drop it when it no longer matters);
        with ``cached``, an unchanged stat line keeps the cached detail as is."""
        entry = self._known.get(tid)
        if entry is None:
            return
        kernel, tgid = self._kernel, entry.tgid
        try:
            raw = self._stat.read(tgid, tid)
            exe, cgroup = self._process_identity(tgid)
            if cached is not None and raw == self._raw.get(tid) and \
                    cached.exe == exe and cached.cgroup == cgroup:
                return
            # one stat read gives policy, priority, nice, state and CPU at a single instant
            stat = parse_stat(raw)
            if not (stat.policy or stat.nice or tid in self._interested):
                self._drop_detail(tid)
                return
            affinity = kernel.affinity(tgid, tid)
            dl = kernel.deadline(tgid, tid) if stat.policy == SCHED_DEADLINE else (0, 0, 0)
        except OSError as err:
            if _gone(err):
                self._forget(tid)
            else:
                self._drop_detail(tid)
                self._note(f"detail-{err.errno}", f"some threads' scheduling details are "
                           f"unreadable ({err.strerror}): left out")
            return
        except ParseError as err:
            self._drop_detail(tid)
            self._note("stat-parse", f"malformed /proc stat skipped ({err})")
            return
        if entry.comm != stat.comm:
            entry.comm = stat.comm
            if self._interest is not None:
                self._pending.add(tid)
        policy = to_sched_class(stat.policy)
        if policy is None:
            unknown_policies.add(stat.policy)
            policy = SchedClass.OTHER
        if stat.nice:
            self._niced[tid] = stat.nice
        else:
            self._niced.pop(tid, None)
        self._raw[tid] = raw
        self._info[tid] = ThreadInfo(
            tid=tid, tgid=tgid, comm=stat.comm, policy=policy,
            rt_priority=stat.rt_priority, nice=stat.nice,
            dl_runtime=dl[0], dl_deadline=dl[1], dl_period=dl[2], affinity=affinity,
            last_cpu=stat.last_cpu, state=stat.state, cgroup=cgroup, exe=exe,
            flags=stat.flags, cpu_ticks=stat.cpu_ticks,
        )

    # -- young threads --------------------------------------------------------

    def young_deadline(self) -> float | None:
        return self.young.deadline()

    def has_news(self) -> bool:
        """True when a thread that mattered left since the last sweep or refresh."""
        return self._dropped

    def check_young(self, now: float) -> list[int]:
        """Ask the young threads whose check is due for their policy; returns those
        not in the table yet that now have a policy other than OTHER (for
        ``refresh``: re-reading them is enough, no sweep needed)."""
        due = self.young.take_due(now)
        if not due:
            return []
        policies = self._kernel.policies([tid for _, _, tid in due])
        hits = []
        for (stage, born, tid), policy in zip(due, policies):
            if policy == 0:
                self.young.again(stage, born, tid)
            elif policy != GONE and tid not in self._info and tid in self._known:
                hits.append(tid)
        return hits

    # -- notes ----------------------------------------------------------------

    def _note(self, key: str, line: str) -> None:
        self._notes.append((key, line))

    def _take_notes(self) -> tuple[str, ...]:
        notes, self._notes = self._notes, []
        return take_new_notes(notes, self._said)

    def close(self) -> None:
        self._stat.close()
        for tid in list(self._exit_fds):
            self._unwatch_exit(tid)
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
