"""What one measured window gives, and the figures of a mode over its rounds (pure)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from guestagent.linux.procfs import CpuTimes

from .cyclictest import Histogram, Summary, merge, summarize

# The three cyclictests of a window: the latency guest's, and the host's own two.
SIDES = ("guest", "host_rt", "host_other")


@dataclass(frozen=True)
class LoadSample:
    """The host load's counters at one instant."""

    t: float
    work: int  # work units done so far, all workers
    cpu_s: float  # CPU seconds the workers have used so far


def load_rate(before: LoadSample, after: LoadSample) -> tuple[float, float]:
    """(work units per second, CPUs' worth of CPU time) between two samples."""
    span = after.t - before.t
    if span <= 0:
        raise ValueError("load samples out of order")
    return (after.work - before.work) / span, (after.cpu_s - before.cpu_s) / span


def guest_busy(before: Mapping[int, CpuTimes], after: Mapping[int, CpuTimes]
               ) -> dict[int, float]:
    """Each vCPU's share of a window that the guest's own /proc/stat counts as not idle
    (idle and iowait are idle), from the file read before and after the window. With
    the CPU each vCPU thread used on the host, it tells the guest's work from QEMU's."""
    busy = {}
    for cpu in sorted(before.keys() & after.keys()):
        total = after[cpu].total - before[cpu].total
        if total > 0:
            busy[cpu] = 1.0 - (after[cpu].idle - before[cpu].idle) / total
    return busy


@dataclass(frozen=True)
class WindowResult:
    mode: str
    round: int
    seconds: float  # wall time between the load samples
    hists: Mapping[str, Histogram]  # side -> histogram
    work_per_s: float
    load_cpus: float
    boost_delay_s: float | None = None  # guest RT task started -> vCPU thread RT on the host
    emulator_delay_s: float | None = None  # ... -> main loop thread RT on the host
    guest_busy: Mapping[int, float] = field(default_factory=dict)  # vCPU -> busy share


@dataclass(frozen=True)
class ModeFigures:
    mode: str
    rounds: int
    summaries: Mapping[str, Summary]  # side -> summary of the pooled histogram
    hists: Mapping[str, Histogram]  # side -> pooled histogram
    guest_p99_rounds: tuple[int | None, ...]
    work_per_s: float  # median over rounds
    load_cpus: float  # median over rounds
    boost_delays: tuple[float | None, ...] = ()
    emulator_delays: tuple[float | None, ...] = ()
    boosted: Mapping[str, float] = field(default_factory=dict)  # thread -> share of time RT
    cpu: Mapping[str, float] = field(default_factory=dict)  # thread -> CPUs' worth it ran
    guest_busy: Mapping[int, float] = field(default_factory=dict)  # vCPU -> mean busy share


def mode_figures(windows: Sequence[WindowResult],
                 boosted: Mapping[str, Mapping[str, float]] | None = None,
                 cpu: Mapping[str, Mapping[str, float]] | None = None
                 ) -> dict[str, ModeFigures]:
    """Per mode, in the order modes first appear: latency from the rounds' histograms
    pooled (as one longer run would give), throughput as the median round."""
    out: dict[str, ModeFigures] = {}
    for mode in dict.fromkeys(w.mode for w in windows):
        rounds = sorted((w for w in windows if w.mode == mode), key=lambda w: w.round)
        pooled = {side: merge(w.hists[side] for w in rounds)
                  for side in SIDES if all(side in w.hists for w in rounds)}
        out[mode] = ModeFigures(
            mode=mode,
            rounds=len(rounds),
            summaries={side: summarize(h) for side, h in pooled.items()},
            hists=pooled,
            guest_p99_rounds=tuple(w.hists["guest"].percentile(0.99) for w in rounds
                                   if "guest" in w.hists),
            work_per_s=statistics.median(w.work_per_s for w in rounds),
            load_cpus=statistics.median(w.load_cpus for w in rounds),
            boost_delays=tuple(w.boost_delay_s for w in rounds),
            emulator_delays=tuple(w.emulator_delay_s for w in rounds),
            boosted=dict((boosted or {}).get(mode, {})),
            cpu=dict((cpu or {}).get(mode, {})),
            guest_busy={v: statistics.mean(w.guest_busy[v] for w in rounds)
                        for v in sorted(set.intersection(*(set(w.guest_busy) for w in rounds)))},
        )
    return out
