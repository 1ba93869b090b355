"""The observer's parsers: procfs's /proc formats plus what only the observer reads into them.

The /proc formats themselves live in guestagent.linux.procfs, which the host
service shares; they are re-exported here for the observer's modules.
Nothing here opens a file.
"""

from __future__ import annotations

from collections.abc import Mapping

from guestagent.linux.procfs import (
    PF_KTHREAD,
    PF_NO_SETAFFINITY,
    CpuTimes,
    InterruptLine,
    ParseError,
    StatFields,
    decode_comm,
    format_cpulist,
    parse_cgroup,
    parse_cpulist,
    parse_interrupts,
    parse_mountinfo_cgroup2,
    parse_proc_stat_steal,
    parse_proc_stat_times,
    parse_sched_dl,
    parse_stat,
    parse_status_cpus,
    systemd_unit,
)

__all__ = [
    "PF_KTHREAD", "PF_NO_SETAFFINITY", "CpuTimes", "InterruptLine", "ParseError", "StatFields",
    "decode_comm", "format_cpulist", "irq_thread_number", "parse_cgroup", "parse_cpulist",
    "parse_interrupts", "parse_mountinfo_cgroup2", "parse_proc_stat_steal",
    "parse_proc_stat_times", "parse_sched_dl", "parse_stat", "parse_status_cpus",
    "steal_fractions", "systemd_unit",
]


def irq_thread_number(comm: str) -> int | None:
    """N of a threaded-IRQ kthread 'irq/N-name' or 'irq/N-s-name' (names cut at 15 bytes)."""
    if not comm.startswith("irq/"):
        return None
    digits = comm[4:].split("-", 1)[0]
    return int(digits) if digits.isdigit() else None


def steal_fractions(prev: Mapping[int, int], cur: Mapping[int, int], seconds: float,
                    ticks_per_second: int) -> dict[int, float]:
    """Fraction of wall time stolen per CPU between two /proc/stat reads, clamped to 0..1."""
    out: dict[int, float] = {}
    for cpu, value in cur.items():
        before = prev.get(cpu)
        if before is None or seconds <= 0:
            out[cpu] = 0.0
            continue
        frac = (value - before) / ticks_per_second / seconds
        out[cpu] = min(1.0, max(0.0, frac))
    return out
