"""Which threads just had their scheduling changed, from syscall tracepoints.

Nothing in /proc or the proc connector says that a thread called
sched_setscheduler(2); without this, only the next sweep notices. With it, the
agent learns within milliseconds which threads' policy, priority, nice level
or affinity was set, re-reads just those, and periodic sweeps become a
backstop. A thread born real-time (from a real-time parent, without a call
of its own) is named too: the scheduler's first wake-up of a new task
(``sched:sched_wakeup_new``), filtered in the kernel to real-time priorities,
so other work's births cost nothing here.

Per CPU (system-wide perf events are per CPU), one small ring buffer takes
three kinds of samples: the *entry* of each watched syscall, whose raw
arguments name the target thread; its *exit*, which wakes the poller once
the new settings are in place; and the real-time births, which wake it too.
Needs CAP_PERFMON (or CAP_SYS_ADMIN) and tracefs; where either is missing,
``SchedWatch`` raises OSError and the agent says so once. Everything read from
the ring is bounded and checked: a record that does not parse means "something
changed, sweep".
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from guestagent.linux.words import store_word

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# syscall -> the argument naming the target thread (0 means the caller)
WATCHED = {"sched_setscheduler": "pid", "sched_setattr": "pid", "sched_setparam": "pid",
           "sched_setaffinity": "pid", "setpriority": "who"}
PRIO_PROCESS = 0  # setpriority's `which` for one thread; groups and users need a sweep
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331,
                       "riscv64": 241}
PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_TID, PERF_SAMPLE_RAW = 1 << 1, 1 << 10
PERF_RECORD_LOST, PERF_RECORD_SAMPLE = 2, 9
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_DISABLE, PERF_EVENT_IOC_SET_OUTPUT = 0x2400, 0x2401, 0x2405
ATTR_DISABLED = 1  # perf_event_attr's first flag bit: open stopped, enable once set up
# _IOW('$', 6, char *): powerpc puts the write direction in another bit
PERF_EVENT_IOC_SET_FILTER = 0x80082406 if os.uname().machine.startswith("ppc") else 0x40082406
# the kernel's prio of a new task: 0..99 real-time, -1 deadline, 100..139 the nice levels
NEWBORN = ("sched", "sched_wakeup_new", b"prio < 100")
# perf_event_attr, PERF_ATTR_SIZE_VER0 (64 bytes): type, size, config,
# sample_period, sample_type, read_format, flag bits, wakeup_events, bp_type, config1.
_ATTR = struct.Struct("=IIQQQQQIIQ")
_DATA_HEAD, _DATA_TAIL = 1024, 1032  # offsets in struct perf_event_mmap_page
_U64 = struct.Struct("=Q")
_HEADER = struct.Struct("=IHH")  # perf_event_header: type, misc, size
_SAMPLE = struct.Struct("=IiI")  # pid, tid, raw size (PERF_SAMPLE_TID | PERF_SAMPLE_RAW)
_COMMON_TYPE, _PID = struct.Struct("=H"), struct.Struct("=i")  # in a raw tracepoint record
DATA_PAGES = 8  # per CPU: 32 KiB, about 250 watched syscalls between two drains
RING_SLACK = 256  # a ring filled to within this many bytes may have lost samples


@dataclass(frozen=True)
class Tracepoint:
    id: int
    offsets: dict  # field name -> byte offset in the raw record


def read_tracepoint(name: str, roots: Iterable[str] = TRACEFS,
                    group: str = "syscalls") -> Tracepoint:
    """A <group>/<name> tracepoint's id and field offsets, from tracefs.

    OSError names why not: permission denied where a root is there but closed
    to this user (tracefs is root-only by default), else not found."""
    denied = ""
    for root in roots:
        try:
            with open(f"{root}/events/{group}/{name}/id") as f:
                tp_id = int(f.read())
            with open(f"{root}/events/{group}/{name}/format") as f:
                fmt = f.read()
        except PermissionError:
            denied = denied or root
            continue
        except (OSError, ValueError):
            continue
        offsets = {m.group(1): int(m.group(2)) for m in
                   re.finditer(r"field:[^;]*?(\w+);\s*offset:(\d+);", fmt)}
        return Tracepoint(tp_id, offsets)
    if denied:
        raise OSError(errno.EACCES, f"tracefs at {denied}: permission denied (needs root)")
    raise OSError(errno.ENOENT, f"tracepoint {group}/{name} not found (is tracefs mounted?)")


@dataclass(frozen=True)
class Changes:
    tids: frozenset[int]  # threads whose scheduling was set
    everything: bool  # some change could not be pinned to threads: sweep them all
    # tid -> tgid of the threads that set their own scheduling (the caller is known);
    # a thread born real-time has none (a new thread and a new process look alike)
    owners: Mapping[int, int] = field(default_factory=dict)


def _int_arg(raw: bytes, offset: int) -> int:
    """A syscall argument (stored as unsigned long) read back as a C int."""
    value = _U64.unpack_from(raw, offset)[0] & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class SchedWatch:
    """Per-CPU ring buffers of watched syscalls; readable once one has returned or a
    real-time thread was born. ``newborns`` says whether births are watched (a
    kernel that refuses the tracepoint or its filter leaves them to the caller)."""

    def __init__(self, cpus: Iterable[int], roots: Iterable[str] = TRACEFS) -> None:
        nr = _NR_PERF_EVENT_OPEN.get(os.uname().machine)
        if nr is None:
            raise OSError(errno.ENOSYS, "perf_event_open: unknown syscall number on this arch")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._nr = nr
        # entry tracepoint id -> (offset of the target argument, offset of `which` or -1)
        self._entries: dict[int, tuple[int, int]] = {}
        exits = []
        for call, arg in WATCHED.items():
            enter = read_tracepoint(f"sys_enter_{call}", roots)
            self._entries[enter.id] = (enter.offsets[arg], enter.offsets.get("which", -1))
            exits.append(read_tracepoint(f"sys_exit_{call}", roots).id)
        try:
            newborn: Tracepoint | None = read_tracepoint(NEWBORN[1], roots, NEWBORN[0])
        except OSError:
            newborn = None
        self._newborn_id, self._newborn_at = (newborn.id, newborn.offsets["pid"]) \
            if newborn is not None and "pid" in newborn.offsets else (-1, 0)
        self.newborns = self._newborn_id >= 0
        self.cpus = frozenset(cpus)
        self._fds: list[int] = []
        self._newborn_fds: list[int] = []
        self._rings: dict[int, mmap.mmap] = {}  # leader fd -> its ring buffer
        self._size = DATA_PAGES * mmap.PAGESIZE
        try:
            for cpu in sorted(self.cpus):
                leader = None
                # exits wake the poller at every sample; entries only fill the ring
                for config, wake in [(e, 0) for e in self._entries] + [(x, 1) for x in exits]:
                    fd = self._open(config, cpu, wake)
                    if leader is None:
                        leader = fd
                        self._rings[fd] = mmap.mmap(fd, mmap.PAGESIZE + self._size,
                                                    mmap.MAP_SHARED,
                                                    mmap.PROT_READ | mmap.PROT_WRITE)
                    else:
                        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, leader)
                if self.newborns and leader is not None:
                    self.newborns = self._watch_newborns(cpu, leader)
        except BaseException:
            self.close()
            raise
        self.wakeups = 0
        self.lost = 0

    def _watch_newborns(self, cpu: int, leader: int) -> bool:
        """Add real-time births on ``cpu`` to its ring; False where the kernel refuses
        (then no CPU watches them: the caller reads births from elsewhere)."""
        fd = -1
        try:  # filtered before it records anything: other births never reach the ring
            fd = self._open(self._newborn_id, cpu, 1, ATTR_DISABLED)
            fcntl.ioctl(fd, PERF_EVENT_IOC_SET_FILTER, NEWBORN[2] + b"\0")
            fcntl.ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, leader)
            fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
        except OSError:
            if fd >= 0:
                self._fds.remove(fd)
                os.close(fd)
            for other in self._newborn_fds:
                fcntl.ioctl(other, PERF_EVENT_IOC_DISABLE, 0)
            return False
        self._newborn_fds.append(fd)
        return True

    def _open(self, config: int, cpu: int, wakeup_events: int, flags: int = 0) -> int:
        attr = ctypes.create_string_buffer(_ATTR.pack(
            PERF_TYPE_TRACEPOINT, _ATTR.size, config, 1, PERF_SAMPLE_TID | PERF_SAMPLE_RAW,
            0, flags, wakeup_events, 0, 0), _ATTR.size)
        fd = self._libc.syscall(self._nr, attr, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"perf_event_open on CPU {cpu}: {os.strerror(err)}")
        self._fds.append(fd)
        return fd

    def fds(self) -> list[int]:
        return list(self._rings)

    def read(self) -> Changes:
        """What changed since the last read, from every CPU's ring; empties them."""
        tids: set[int] = set()
        owners: dict[int, int] = {}
        everything = False
        for ring in self._rings.values():
            everything |= self._read_ring(ring, tids, owners)
        if tids or everything:
            self.wakeups += 1
        return Changes(frozenset(tids), everything, owners)

    def _read_ring(self, ring: mmap.mmap, tids: set[int], owners: dict[int, int]) -> bool:
        head = _U64.unpack_from(ring, _DATA_HEAD)[0]
        tail = _U64.unpack_from(ring, _DATA_TAIL)[0]
        if head == tail:
            return False
        # A full ring may have dropped samples; the kernel reports them (a LOST
        # record) only once it has room again, so judge by the fill level now.
        everything = head - tail > self._size - RING_SLACK
        if not everything:
            everything = self._parse(self._copy(ring, tail, head - tail), tids, owners)
        store_word(ring, _DATA_TAIL, "Q", head)  # one store: the kernel reads it any time
        return everything

    def _parse(self, data: bytes, tids: set[int], owners: dict[int, int]) -> bool:
        """The records of one ring, copied out in one piece; True: sweep."""
        pos, end = 0, len(data)
        while pos < end:
            if pos + _HEADER.size > end:
                return True
            kind, _, size = _HEADER.unpack_from(data, pos)
            if size < _HEADER.size or size % 8 or pos + size > end:
                return True
            if kind == PERF_RECORD_LOST:
                self.lost += 1
                return True
            if kind == PERF_RECORD_SAMPLE and \
                    self._sample(data[pos + _HEADER.size:pos + size], tids, owners):
                return True
            pos += size
        return False

    def _copy(self, ring: mmap.mmap, pos: int, length: int) -> bytes:
        """``length`` bytes of the data area from ``pos`` (it may wrap around the end)."""
        start = mmap.PAGESIZE + pos % self._size
        first = min(length, mmap.PAGESIZE + self._size - start)
        return ring[start:start + first] + ring[mmap.PAGESIZE:mmap.PAGESIZE + length - first]

    def _sample(self, body: bytes, tids: set[int], owners: dict[int, int]) -> bool:
        """Add a sample's target thread to `tids` (and to `owners` with its process when
        it is the caller); True when it names no single thread."""
        if len(body) < _SAMPLE.size:
            return True
        pid, tid, raw_size = _SAMPLE.unpack_from(body)
        raw = body[_SAMPLE.size:_SAMPLE.size + raw_size]
        if len(raw) < 2:
            return True
        kind = _COMMON_TYPE.unpack_from(raw)[0]
        if kind == self._newborn_id:  # the kernel's filter let only real-time births in
            if len(raw) < self._newborn_at + _PID.size:
                return True
            child = _PID.unpack_from(raw, self._newborn_at)[0]
            if child <= 0:
                return True
            tids.add(child)
            return False
        entry = self._entries.get(kind)
        if entry is None:
            return False  # an exit: its entry, in this ring or another, names the target
        target_at, which_at = entry
        if len(raw) < max(target_at, which_at) + 8:
            return True
        if which_at >= 0 and _int_arg(raw, which_at) != PRIO_PROCESS:
            return True  # a process group or a user: many threads
        target = _int_arg(raw, target_at)
        if target < 0:
            return True
        if target in (0, tid):
            owners[tid] = pid
        tids.add(target or tid)
        return False

    def close(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
