"""The one layer that touches the kernel: /proc, /sys, scheduler syscalls, netlink, udev.

``LiveKernel`` reads the running machine. ``RecordedKernel`` reads a directory
holding a recorded copy of /proc and /sys (tests/data/trees/<name>/) and
derives scheduling fields from the recorded text instead of syscalls, so code
above this layer runs unchanged against shapes this machine lacks.

Errors: every method raises OSError (ProcessLookupError/FileNotFoundError when
a thread is gone, PermissionError when unprivileged); callers decide what is
normal. ``policies``/``nices`` are the hot path of the sweep and report a gone
thread as ``GONE`` instead of raising, so one exit does not slow the batch.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import resource
import select
import socket
import struct
from collections.abc import Container, Sequence

from guestagent.observe.events import ProcEvent, parse_proc_events
from guestagent.observe.parse import (
    parse_sched_dl,
    parse_stat,
    parse_status_cpus,
)
from guestagent.observe.schedwatch import SchedWatch
from guestagent.sched import SCHED_RESET_ON_FORK
from guestagent.transport.uevents import UeventMonitor  # CPU hotplug: the same monitor

GONE = -1  # policy/nice placeholder for a thread that exited mid-sweep
STAT_FD_CAP = 1024  # stat fds kept open for the threads that matter
PIDFD_THREAD = os.O_EXCL  # include/uapi/linux/pidfd.h (Linux 6.9)
_NR_SCHED_GETATTR = {"x86_64": 315, "aarch64": 275, "riscv64": 275, "ppc64le": 356,
                     "s390x": 346, "i686": 352, "armv7l": 381}


NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
NLMSG_DONE = 3


def proc_listen_message(pid: int) -> bytes:
    """nlmsghdr + cn_msg + the PROC_CN_MCAST_LISTEN op (linux/cn_proc.h)."""
    op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
    cn_msg = struct.pack("=IIIIHH", CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
    return struct.pack("=IHHII", 16 + len(cn_msg), NLMSG_DONE, 0, 0, pid) + cn_msg


class ProcEventSource:
    """A subscribed proc-connector socket; ``read()`` drains it without blocking."""

    def __init__(self) -> None:
        # The subscription is one netlink message; the socket module speaks
        # AF_NETLINK itself. (pyroute2's ProcEventSocket does the same, but
        # importing pyroute2 costs about 21 MB of RSS, half the agent's budget.)
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                   NETLINK_CONNECTOR)
        try:
            try:  # a large buffer rides out fork storms; FORCE needs CAP_NET_ADMIN (we have it)
                self._sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
            except OSError:
                pass
            self._sock.bind((0, CN_IDX_PROC))
            self._sock.send(proc_listen_message(os.getpid()))
            self._fd = self._sock.fileno()
            os.set_blocking(self._fd, False)
        except BaseException:
            self._sock.close()
            raise
        self._buf = bytearray(1 << 16)  # reused: each event is a datagram of its own
        self.malformed = 0

    def fileno(self) -> int:
        return self._fd

    def read(self) -> tuple[list[ProcEvent], bool]:
        """All queued events, and whether the kernel dropped some (buffer overrun)."""
        events: list[ProcEvent] = []
        lost = False
        buf, recv_into = self._buf, self._sock.recv_into
        while True:
            try:
                size = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    lost = True
                    continue
                raise
            if not size:
                break
            got, bad = parse_proc_events(buf, size)
            events.extend(got)
            self.malformed += bad
        return events, lost

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


class Kernel:
    """Reads of the kernel, by absolute path (e.g. '/proc/interrupts')."""

    description = "kernel"

    def path(self, path: str) -> str:
        raise NotImplementedError

    def read_bytes(self, path: str) -> bytes:
        with open(self.path(path), "rb") as f:
            return f.read()

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8", "replace")

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self.path(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self.path(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(self.path(path))

    def realpath(self, path: str) -> str:
        return os.path.realpath(self.path(path))

    def thread_ids(self) -> list[tuple[int, int]]:
        """(tgid, tid) of every thread visible in /proc; processes that vanish are skipped."""
        out: list[tuple[int, int]] = []
        for entry in self.listdir("/proc"):
            if not entry.isdigit():
                continue
            tgid = int(entry)
            try:
                tasks = self.listdir(f"/proc/{entry}/task")
            except OSError:
                continue
            out.extend((tgid, int(t)) for t in tasks if t.isdigit())
        return out

    def stat(self, tgid: int, tid: int) -> bytes:
        return self.read_bytes(f"/proc/{tgid}/task/{tid}/stat")

    def comm(self, tgid: int, tid: int) -> bytes:
        raw = self.read_bytes(f"/proc/{tgid}/task/{tid}/comm")
        return raw[:-1] if raw.endswith(b"\n") else raw

    def policies(self, tids: Sequence[int]) -> list[int]:
        raise NotImplementedError

    def nices(self, tids: Sequence[int]) -> list[int]:
        raise NotImplementedError

    def rt_priorities(self, tids: Sequence[int]) -> list[int]:
        """sched_priority of each thread (0 unless FIFO/RR), GONE for one that exited."""
        raise NotImplementedError

    def stat_reader(self, cap: int = STAT_FD_CAP) -> StatReader:
        """Reads stat through kept-open fds (see ``StatReader``)."""
        return StatReader(self, cap)

    def affinity(self, tgid: int, tid: int) -> frozenset[int]:
        raise NotImplementedError

    def deadline(self, tgid: int, tid: int) -> tuple[int, int, int]:
        """(runtime, deadline, period) in ns of a SCHED_DEADLINE thread."""
        raise NotImplementedError

    def proc_events(self) -> ProcEventSource:
        raise OSError(errno.ENOTSUP, "no process-events connector")

    def exit_watch(self, tid: int) -> int:
        """An fd that turns readable when thread ``tid`` exits (a thread pidfd)."""
        raise OSError(errno.ENOTSUP, "no thread pidfds")

    def cpu_monitor(self) -> UeventMonitor:
        raise OSError(errno.ENOTSUP, "no udev monitor")

    def sched_watch(self, cpus: frozenset[int]) -> SchedWatch:
        raise OSError(errno.ENOTSUP, "no scheduler-change events")

    def net_links(self) -> list[str]:
        return sorted(self.listdir("/sys/class/net"))

    def clock_ticks(self) -> int:
        return 100


class StatReader:
    """/proc/<tgid>/task/<tid>/stat of the threads that matter, read again and again.

    An fd kept open per thread and pread() from offset 0 costs a third of an
    open/read/close (measured here). The fd pins the thread's struct pid, not
    its number: once the thread exits, pread fails with ESRCH even if the tid
    is reused. At most ``cap`` fds (and at most half the soft RLIMIT_NOFILE) are
    kept; beyond that reads fall back to open/read/close.
    """

    def __init__(self, kernel: Kernel, cap: int = 1024) -> None:
        self._kernel = kernel
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.cap = cap if soft == resource.RLIM_INFINITY else max(0, min(cap, soft // 2))
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._fds)

    def __contains__(self, tid: object) -> bool:
        return tid in self._fds

    def read(self, tgid: int, tid: int) -> bytes:
        fd = self._fds.get(tid)
        if fd is None:
            if len(self._fds) >= self.cap:
                return self._kernel.stat(tgid, tid)
            try:
                fd = os.open(self._kernel.path(f"/proc/{tgid}/task/{tid}/stat"),
                             os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                if err.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                self.cap = len(self._fds)  # out of fds: stop caching, keep working
                return self._kernel.stat(tgid, tid)
            self._fds[tid] = fd
        try:
            raw = os.pread(fd, 4096, 0)
        except OSError:
            self.drop(tid)
            raise
        if not raw:  # never seen, but an empty stat can only mean the thread is gone
            self.drop(tid)
            raise ProcessLookupError(errno.ESRCH, f"thread {tid} gone")
        return raw

    def drop(self, tid: int) -> None:
        fd = self._fds.pop(tid, None)
        if fd is not None:
            os.close(fd)

    def keep_only(self, tids: Container[int]) -> None:
        """Close the fds of threads that no longer matter."""
        for tid in [t for t in self._fds if t not in tids]:
            self.drop(tid)

    def close(self) -> None:
        for tid in list(self._fds):
            self.drop(tid)


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64)]


class LiveKernel(Kernel):
    """The running machine."""

    description = "live"

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None

    def path(self, path: str) -> str:
        return path

    def policies(self, tids: Sequence[int]) -> list[int]:
        try:  # fast path: one C-level loop; any exit mid-sweep falls back per thread
            out = list(map(os.sched_getscheduler, tids))
        except OSError:
            out = [_or_gone(os.sched_getscheduler, t) for t in tids]
        if out and max(out) >= SCHED_RESET_ON_FORK:  # rare: only then a Python-level pass
            out = [p & ~SCHED_RESET_ON_FORK for p in out]
        return out

    def nices(self, tids: Sequence[int]) -> list[int]:
        try:
            return list(map(os.getpriority, itertools.repeat(os.PRIO_PROCESS), tids))
        except OSError:
            return [_or_gone(lambda t: os.getpriority(os.PRIO_PROCESS, t), t) for t in tids]

    def rt_priorities(self, tids: Sequence[int]) -> list[int]:
        try:
            return [p.sched_priority for p in map(os.sched_getparam, tids)]
        except OSError:
            return [_or_gone(lambda t: os.sched_getparam(t).sched_priority, t) for t in tids]

    def deadline(self, tgid: int, tid: int) -> tuple[int, int, int]:
        attr = self._sched_getattr(tid)
        return attr.sched_runtime, attr.sched_deadline, attr.sched_period

    def _sched_getattr(self, tid: int) -> _SchedAttr:
        # os has no sched_getattr wrapper; DEADLINE parameters are only reachable this way
        nr = _NR_SCHED_GETATTR.get(os.uname().machine)
        if nr is None:
            raise OSError(errno.ENOSYS, "sched_getattr: unknown syscall number on this arch")
        if self._libc is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
        attr = _SchedAttr()
        if self._libc.syscall(nr, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return attr

    def affinity(self, tgid: int, tid: int) -> frozenset[int]:
        return frozenset(os.sched_getaffinity(tid))

    def proc_events(self) -> ProcEventSource:
        return ProcEventSource()

    def exit_watch(self, tid: int) -> int:
        # PIDFD_THREAD (Linux 6.9): a pidfd of one thread, readable once that thread
        # exits (without it, a leader's pidfd waits for its whole group). Older
        # kernels refuse the flag with EINVAL.
        return os.pidfd_open(tid, PIDFD_THREAD)

    def cpu_monitor(self) -> UeventMonitor:
        return UeventMonitor(("cpu",))

    def sched_watch(self, cpus: frozenset[int]) -> SchedWatch:
        return SchedWatch(cpus)

    def clock_ticks(self) -> int:
        return os.sysconf("SC_CLK_TCK")


def _or_gone(call, tid: int) -> int:
    try:
        return call(tid)
    except (OSError, ValueError):  # gone, or (recorded trees) an unparsable stat
        return GONE


class RecordedKernel(Kernel):
    """A recorded tree: <root>/proc/... and <root>/sys/...; no syscalls, no events."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.description = f"recorded tree {root}"

    def path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _tgid_of(self, tid: int) -> int:
        # recorded trees keep threads under their process only: find the owner once
        for entry in self.listdir("/proc"):
            if entry.isdigit() and os.path.isdir(self.path(f"/proc/{entry}/task/{tid}")):
                return int(entry)
        raise ProcessLookupError(errno.ESRCH, f"no thread {tid}")

    def _stat_of(self, tid: int):
        return parse_stat(self.stat(self._tgid_of(tid), tid))

    def policies(self, tids: Sequence[int]) -> list[int]:
        return [_or_gone(lambda t: self._stat_of(t).policy, t) for t in tids]

    def nices(self, tids: Sequence[int]) -> list[int]:
        return [_or_gone(lambda t: self._stat_of(t).nice, t) for t in tids]

    def rt_priorities(self, tids: Sequence[int]) -> list[int]:
        return [_or_gone(lambda t: self._stat_of(t).rt_priority, t) for t in tids]

    def deadline(self, tgid: int, tid: int) -> tuple[int, int, int]:
        return parse_sched_dl(self.read_text(f"/proc/{tgid}/task/{tid}/sched"))

    def affinity(self, tgid: int, tid: int) -> frozenset[int]:
        return parse_status_cpus(self.read_text(f"/proc/{tgid}/task/{tid}/status"))


def wait_readable(fds: Sequence[int], timeout: float) -> list[int]:
    """select() helper for tests and benchmarks that drive an Observer."""
    if not fds:
        return []
    return select.select(list(fds), [], [], timeout)[0]
