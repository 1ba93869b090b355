"""Per-vCPU capacity from /proc/stat and the vCPU threads' own run time.

capacity = 1024 * (1 - load of the pCPU the vCPU last ran on, from
everything except that vCPU thread), over the interval between two samples.
Parsing and arithmetic are pure; `read_sample` is the only IO.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from guestagent.linux.procfs import CpuTimes, ParseError, parse_proc_stat_times, parse_stat
from guestagent.protocol.model import CAPACITY_MAX, AppliedFlag, VcpuCapacity


@dataclass(frozen=True)
class ThreadTimes:
    run: int  # utime + stime, USER_HZ ticks
    pcpu: int  # CPU it last ran on


@dataclass(frozen=True)
class Sample:
    cpus: Mapping[int, CpuTimes]
    threads: Mapping[int, ThreadTimes]  # vCPU -> its thread's times


def parse_task_stat(raw: bytes) -> ThreadTimes | None:
    try:
        stat = parse_stat(raw)
    except ParseError:
        return None
    return ThreadTimes(run=stat.cpu_ticks, pcpu=stat.last_cpu)


def vcpu_capacity(before: Sample, after: Sample, vcpu: int) -> tuple[int, int, int]:
    """(capacity, host_load, pcpu) for one vCPU; (1024, -1, pcpu) when it cannot tell."""
    now = after.threads.get(vcpu)
    if now is None:
        return CAPACITY_MAX, -1, -1
    then = before.threads.get(vcpu)
    c0, c1 = before.cpus.get(now.pcpu), after.cpus.get(now.pcpu)
    if then is None or c0 is None or c1 is None or c1.total <= c0.total:
        return CAPACITY_MAX, -1, now.pcpu
    span = c1.total - c0.total
    # Steal is time a hypervisor below took the pCPU away: as much a loss as other load.
    # The thread may have run elsewhere part of the time: never count below zero.
    others = (c1.busy + c1.steal - c0.busy - c0.steal) - max(0, now.run - then.run)
    load = min(max(others / span, 0.0), 1.0)
    host_load = round(CAPACITY_MAX * load)
    return CAPACITY_MAX - host_load, host_load, now.pcpu


def capacities(before: Sample, after: Sample, vcpus: Mapping[int, AppliedFlag],
               contend: Mapping[int, int], generation: int) -> tuple[VcpuCapacity, ...]:
    """What to publish: one VcpuCapacity per vCPU, with what was applied and acknowledged."""
    out = []
    for vcpu in sorted(vcpus):
        capacity, host_load, pcpu = vcpu_capacity(before, after, vcpu)
        if vcpu in contend:  # operator override, used to exercise guest steering
            capacity = contend[vcpu]
            host_load = CAPACITY_MAX - capacity
        out.append(VcpuCapacity(vcpu, capacity, pcpu, host_load, vcpus[vcpu], generation))
    return tuple(out)


def read_sample(pid: int, tids: Mapping[int, int]) -> Sample:
    """Read /proc/stat and each vCPU thread's stat; vanished threads are left out."""
    with open("/proc/stat", encoding="ascii", errors="replace") as f:
        text = f.read()
    try:
        cpus = parse_proc_stat_times(text)
    except ParseError:
        cpus = {}  # capacity unknown this period (1024, -1), not a reason to stop
    threads: dict[int, ThreadTimes] = {}
    for vcpu, tid in tids.items():
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                times = parse_task_stat(f.read())
        except OSError:
            continue
        if times is not None:
            threads[vcpu] = times
    return Sample(cpus, threads)
