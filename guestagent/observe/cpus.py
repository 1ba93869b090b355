"""The vCPU table: which CPUs exist, which are isolated, how much time the host steals."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from guestagent.observe.kernel import Kernel, UeventMonitor
from guestagent.observe.parse import (
    CpuTimes,
    ParseError,
    parse_cpulist,
    parse_mountinfo_cgroup2,
    parse_proc_stat_times,
    steal_fractions,
)

if TYPE_CHECKING:
    from guestagent.observe.threads import ThreadInfo

_CPU = "/sys/devices/system/cpu"


@dataclass(frozen=True)
class CpuState:
    """The guest's CPUs as the kernel describes them."""

    possible: frozenset[int]
    online: frozenset[int]
    isolated: frozenset[int]  # isolcpus= (domain isolation)
    nohz_full: frozenset[int]
    partitions: frozenset[int]  # CPUs of isolated cgroup v2 cpuset partitions
    steal: Mapping[int, float] = field(default_factory=dict)  # fraction 0..1 since last sweep
    # Shares of wall time since the previous sweep (empty on the first): busy is
    # everything but idle, iowait and steal; lowprio is what niced, SCHED_BATCH
    # and SCHED_IDLE work took of it.
    busy: Mapping[int, float] = field(default_factory=dict)
    lowprio: Mapping[int, float] = field(default_factory=dict)

    @property
    def nr_vcpus(self) -> int:
        """How many vCPUs the hints cover: every possible CPU, numbered from 0."""
        return max(self.possible, default=0) + 1

    @property
    def offline(self) -> frozenset[int]:
        return self.possible - self.online


def isolated_partitions(kernel: Kernel, root: str) -> frozenset[int]:
    """CPUs of every cgroup whose cpuset.cpus.partition is 'isolated'.

    Only descends where the cpuset controller is enabled, so a systemd tree of
    hundreds of cgroups costs a few reads.
    """
    cpus: set[int] = set()
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            part = kernel.read_text(f"{path}/cpuset.cpus.partition").split()
        except OSError:
            part = []
        if part[:1] == ["isolated"] and "invalid" not in " ".join(part[1:]):
            try:
                cpus |= parse_cpulist(kernel.read_text(f"{path}/cpuset.cpus.effective"))
            except (OSError, ParseError):
                pass
        try:
            enabled = kernel.read_text(f"{path}/cgroup.subtree_control").split()
        except OSError:
            continue
        if "cpuset" not in enabled:
            continue
        try:
            children = kernel.listdir(path)
        except OSError:
            continue
        for name in children:
            child = f"{path}/{name}"
            if kernel.exists(f"{child}/cgroup.procs"):
                stack.append(child)
    return frozenset(cpus)


def with_lowprio_threads(cpus: CpuState, threads: Iterable[ThreadInfo],
                         prev_ticks: Mapping[int, int], seconds: float,
                         hz: int, own_tgid: int | None = None) -> CpuState:
    """Add the CPU time of SCHED_BATCH/IDLE and niced threads to each CPU's lowprio share.

    /proc/stat's nice column misses SCHED_BATCH and SCHED_IDLE work at nice 0;
    the threads' own run time, charged to the CPU they last ran on, covers it.
    The larger of the two estimates counts, capped by the CPU's busy share.
    The observing process's own threads (``own_tgid``) that are not low-priority are
    taken out of busy: the agent's sweeps are not the vCPU's workload, and counting them
    would keep a vCPU the agent runs on from looking low-priority, the more so once the
    host has lowered it and the agent's share of it grows.
    """
    if seconds <= 0 or not cpus.busy:
        return cpus
    ran: dict[int, float] = {}
    own: dict[int, float] = {}
    for t in threads:
        if (t.is_lowprio or t.tgid == own_tgid) and t.tid in prev_ticks:
            delta = max(0, t.cpu_ticks - prev_ticks[t.tid]) / hz / seconds
            into = ran if t.is_lowprio else own
            into[t.last_cpu] = into.get(t.last_cpu, 0.0) + delta
    busy = {cpu: max(0.0, b - own.get(cpu, 0.0)) for cpu, b in cpus.busy.items()}
    lowprio = {cpu: min(b, max(cpus.lowprio.get(cpu, 0.0), ran.get(cpu, 0.0)))
               for cpu, b in busy.items()}
    return replace(cpus, busy=busy, lowprio=lowprio)


def _fractions(prev: Mapping[int, CpuTimes], cur: Mapping[int, CpuTimes], column: str,
               seconds: float, hz: int) -> dict[int, float]:
    return steal_fractions({c: getattr(t, column) for c, t in prev.items()},
                           {c: getattr(t, column) for c, t in cur.items()}, seconds, hz)


class CpuTable:
    """Reads CPU state each sweep; keeps the previous steal counters for rates."""

    def __init__(self, kernel: Kernel, watch: bool = True) -> None:
        self._kernel = kernel
        self._prev: dict[int, CpuTimes] = {}
        self._prev_at: float | None = None
        self._notes: list[tuple[str, str]] = []
        self.monitor: UeventMonitor | None = None
        self.changes = 0  # online/offline uevents seen
        if watch:
            try:
                self.monitor = kernel.cpu_monitor()
            except Exception as err:  # pyudev raises assorted errors; none is fatal here
                why = getattr(err, "strerror", None) or str(err) or type(err).__name__
                self._notes.append(("udev", f"CPU hotplug events unavailable ({why}): "
                                    "CPU changes seen at the next sweep"))

    def fileno(self) -> int | None:
        return self.monitor.fileno() if self.monitor else None

    def handle_readable(self) -> None:
        if self.monitor:
            try:
                self.changes += self.monitor.drain()
            except Exception as err:  # pyudev wraps socket errors in its own types
                self._notes.append(("!udev-read", f"CPU hotplug event read failed ({err})"))

    def sweep(self, now: float) -> tuple[CpuState, list[tuple[str, str]]]:
        notes, self._notes = self._notes, []
        possible = self._cpulist(f"{_CPU}/possible", notes)
        online = self._cpulist(f"{_CPU}/online", notes)
        isolated = self._cpulist(f"{_CPU}/isolated", notes)
        nohz = self._cpulist(f"{_CPU}/nohz_full", notes, missing_ok=True)
        partitions = frozenset()
        try:
            root = parse_mountinfo_cgroup2(self._kernel.read_text("/proc/self/mountinfo"))
        except OSError:
            root = None
        if root:
            partitions = isolated_partitions(self._kernel, root)
        steal: dict[int, float] = {}
        busy: dict[int, float] = {}
        nice: dict[int, float] = {}
        try:
            cur = parse_proc_stat_times(self._kernel.read_text("/proc/stat"))
        except (OSError, ParseError) as err:
            notes.append(("stat", f"/proc/stat unreadable ({getattr(err, 'strerror', err)}): "
                          "no steal time"))
        else:
            if self._prev_at is not None:
                dt, hz, prev = now - self._prev_at, self._kernel.clock_ticks(), self._prev
                steal = _fractions(prev, cur, "steal", dt, hz)
                busy = _fractions(prev, cur, "busy", dt, hz)
                nice = _fractions(prev, cur, "nice", dt, hz)
            else:
                steal = {cpu: 0.0 for cpu in cur}
            self._prev, self._prev_at = cur, now
        if not possible:
            possible = online
        return CpuState(possible, online, isolated, nohz, partitions, steal, busy,
                        nice), notes

    def _cpulist(self, path: str, notes: list[tuple[str, str]],
                 missing_ok: bool = False) -> frozenset[int]:
        try:
            return parse_cpulist(self._kernel.read_text(path))
        except FileNotFoundError:
            if not missing_ok:
                notes.append((path, f"{path} missing: taken as empty"))
        except (OSError, ParseError) as err:
            notes.append((path, f"{path} unreadable ({getattr(err, 'strerror', err)}): "
                          "taken as empty"))
        return frozenset()

    def close(self) -> None:
        if self.monitor:
            self.monitor.close()
            self.monitor = None
