"""A wake-up when any thread's scheduling settings change, from syscall tracepoints.

Nothing in /proc or the proc connector says that a thread called
sched_setscheduler(2); without this, only the next sweep notices. With it, the
exit of the syscalls that change a policy, priority, nice level or affinity
wakes the agent within milliseconds, and periodic sweeps become a backstop.

One perf event per tracepoint and online CPU (system-wide events are per CPU),
all of a CPU's events feeding one small ring buffer, so there is one fd per
CPU to poll. The samples carry nothing the agent reads: the ring buffer only
exists because poll() needs one; draining means moving its tail to its head.
Needs CAP_PERFMON (or CAP_SYS_ADMIN) and tracefs; where either is missing,
``SchedWatch.open`` raises OSError and the agent says so once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterable

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# The exits, not the entries: at syscall exit the new settings are in place.
TRACEPOINTS = ("sys_exit_sched_setscheduler", "sys_exit_sched_setattr",
               "sys_exit_sched_setparam", "sys_exit_setpriority",
               "sys_exit_sched_setaffinity")
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331,
                       "riscv64": 241}
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_SET_OUTPUT = 0x2405
# perf_event_attr, PERF_ATTR_SIZE_VER0 (64 bytes): type, size, config,
# sample_period, sample_type, read_format, flag bits, wakeup_events, bp_type, config1.
_ATTR = struct.Struct("=IIQQQQQIIQ")
_DATA_HEAD, _DATA_TAIL = 1024, 1032  # offsets in struct perf_event_mmap_page
_U64 = struct.Struct("=Q")


def tracepoint_id(name: str, roots: Iterable[str] = TRACEFS) -> int:
    for root in roots:
        try:
            with open(f"{root}/events/syscalls/{name}/id") as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    raise OSError(errno.ENOENT, f"tracepoint syscalls/{name} not found (is tracefs mounted?)")


class SchedWatch:
    """Per-CPU ring buffers that become readable when a watched syscall returns."""

    def __init__(self, cpus: Iterable[int], roots: Iterable[str] = TRACEFS) -> None:
        nr = _NR_PERF_EVENT_OPEN.get(os.uname().machine)
        if nr is None:
            raise OSError(errno.ENOSYS, "perf_event_open: unknown syscall number on this arch")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._nr = nr
        ids = [tracepoint_id(name, roots) for name in TRACEPOINTS]
        self.cpus = frozenset(cpus)
        self._fds: list[int] = []
        self._rings: dict[int, mmap.mmap] = {}  # leader fd -> its ring buffer
        try:
            for cpu in sorted(self.cpus):
                leader = self._open(ids[0], cpu)
                self._rings[leader] = mmap.mmap(leader, 2 * mmap.PAGESIZE, mmap.MAP_SHARED,
                                                mmap.PROT_READ | mmap.PROT_WRITE)
                for config in ids[1:]:
                    fcntl.ioctl(self._open(config, cpu), PERF_EVENT_IOC_SET_OUTPUT, leader)
        except BaseException:
            self.close()
            raise
        self.wakeups = 0

    def _open(self, config: int, cpu: int) -> int:
        # sample every event, wake the poller at every sample; enabled at once
        attr = ctypes.create_string_buffer(_ATTR.pack(PERF_TYPE_TRACEPOINT, _ATTR.size, config,
                                                      1, 0, 0, 0, 1, 0, 0), _ATTR.size)
        fd = self._libc.syscall(self._nr, attr, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"perf_event_open on CPU {cpu}: {os.strerror(err)}")
        self._fds.append(fd)
        return fd

    def fds(self) -> list[int]:
        return list(self._rings)

    def drain(self, fd: int) -> bool:
        """Mark a ring buffer read; True when something had changed since the last drain."""
        ring = self._rings.get(fd)
        if ring is None:
            return False
        head = _U64.unpack_from(ring, _DATA_HEAD)[0]
        if head == _U64.unpack_from(ring, _DATA_TAIL)[0]:
            return False
        _U64.pack_into(ring, _DATA_TAIL, head)
        self.wakeups += 1
        return True

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
