"""QEMU threads' scheduling class over the run, from periodic samples (pure).

A sample says what one thread's policy was at one instant; a thread is taken to keep
that state until its next sample (sample-and-hold), so the error of every figure here
is at most one sampling period per change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SCHED_FIFO, SCHED_RR = 1, 2
RT_POLICIES = frozenset({SCHED_FIFO, SCHED_RR})
POLICY_NAMES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle", 6: "deadline"}
MAIN_THREAD = "main loop"  # QEMU's main thread, which libvirt calls the emulator thread


@dataclass(frozen=True)
class ThreadSample:
    t: float  # host monotonic seconds
    tid: int
    name: str  # unique per thread: MAIN_THREAD, "CPU 1/TCG", "worker [4711]", ...
    policy: int
    priority: int
    nice: int
    run_ns: int | None = None  # the thread's total run time (schedstat), if read

    @property
    def boosted(self) -> bool:
        return (self.policy & 0xFF) in RT_POLICIES

    @property
    def label(self) -> str:
        """The scheduling class as the timeline shows it: "fifo 40", "other nice 10"."""
        name = POLICY_NAMES.get(self.policy & 0xFF, str(self.policy))
        if self.boosted:
            return f"{name} {self.priority}"
        return f"{name} nice {self.nice}" if self.nice else name


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    label: str
    boosted: bool


@dataclass(frozen=True)
class Window:
    """One measured interval of one mode."""

    mode: str
    round: int
    start: float
    end: float


def segments(samples: Iterable[ThreadSample], end: float,
             gone_after: float | None = None) -> dict[str, list[Segment]]:
    """Per thread name, runs of one scheduling state; the last run ends at ``end``, or,
    with ``gone_after``, at the thread's last sample if the newest sample of any thread
    is more than ``gone_after`` later: the thread has exited (a thread pool worker that
    ended at FIFO must not count as RT for the rest of the run)."""
    ordered = sorted(samples, key=lambda s: s.t)
    newest = ordered[-1].t if ordered else end
    by_thread: dict[str, list[ThreadSample]] = {}
    for s in ordered:
        by_thread.setdefault(s.name, []).append(s)
    out: dict[str, list[Segment]] = {}
    for name, series in by_thread.items():
        gone = gone_after is not None and newest - series[-1].t > gone_after
        runs: list[Segment] = []
        for i, s in enumerate(series):
            if i + 1 < len(series):
                stop = series[i + 1].t
            else:
                stop = s.t if gone else max(end, s.t)
            if runs and runs[-1].label == s.label and runs[-1].end == s.t:
                runs[-1] = Segment(runs[-1].start, stop, s.label, s.boosted)
            else:
                runs.append(Segment(s.t, stop, s.label, s.boosted))
        out[name] = runs
    return out


def boosted_seconds(runs: Sequence[Segment], start: float, end: float) -> float:
    """Time within [start, end] that a thread spent at an RT policy."""
    return sum(max(0.0, min(r.end, end) - max(r.start, start)) for r in runs if r.boosted)


def boosted_by_mode(timeline: Mapping[str, Sequence[Segment]], windows: Sequence[Window]
                    ) -> dict[str, dict[str, float]]:
    """mode -> thread name -> share of that mode's measured time spent boosted (0..1)."""
    out: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(w.mode for w in windows):
        spans = [w for w in windows if w.mode == mode]
        total = sum(w.end - w.start for w in spans)
        if total <= 0:
            continue
        out[mode] = {name: sum(boosted_seconds(runs, w.start, w.end) for w in spans) / total
                     for name, runs in timeline.items()}
    return out


def cpu_by_mode(samples: Iterable[ThreadSample], windows: Sequence[Window]
                ) -> dict[str, dict[str, float]]:
    """mode -> thread name -> CPUs' worth of run time over that mode's measured time: what
    each thread used, boosted or not, from the run time of its first and last sample inside
    each window (a budget that earns less than this cannot keep the thread boosted)."""
    by_thread: dict[str, list[ThreadSample]] = {}
    for s in sorted(samples, key=lambda s: s.t):
        if s.run_ns is not None:
            by_thread.setdefault(s.name, []).append(s)
    out: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(w.mode for w in windows):
        used: dict[str, tuple[float, float]] = {}  # name -> (run seconds, wall seconds)
        for w in (w for w in windows if w.mode == mode):
            for name, series in by_thread.items():
                inside = [s for s in series if w.start <= s.t <= w.end]
                if len(inside) < 2 or inside[-1].t <= inside[0].t:
                    continue
                ran, wall = used.get(name, (0.0, 0.0))
                used[name] = (ran + max(0, inside[-1].run_ns - inside[0].run_ns) / 1e9,
                              wall + inside[-1].t - inside[0].t)
        out[mode] = {name: ran / wall for name, (ran, wall) in used.items() if wall > 0}
    return out


def first_boost(samples: Iterable[ThreadSample], name: str, since: float) -> float | None:
    """The first time at or after ``since`` a sample shows thread ``name`` boosted."""
    times = [s.t for s in samples if s.name == name and s.t >= since and s.boosted]
    return min(times) if times else None


def thread_order(names: Iterable[str]) -> list[str]:
    """The main (emulator) thread first, then vCPUs by index, then the rest by name."""
    def key(name: str) -> tuple:
        head = name.split("/", 1)[0]
        if head.startswith("CPU ") and head[4:].isdigit():
            return (1, int(head[4:]), name)
        return (0 if name == MAIN_THREAD else 2, 0, name)
    return sorted(set(names), key=key)


def class_of(label: str) -> str:
    """The colour group of a label: "RT", "nice < 0", "nice > 0" or "normal"."""
    head, _, rest = label.partition(" ")
    if head in ("fifo", "rr", "deadline"):
        return "RT"
    if rest.startswith("nice "):
        return "nice < 0" if int(rest[5:]) < 0 else "nice > 0"
    return "normal"
