"""cyclictest's command lines and histogram output, and the figures taken from it (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

INTERVAL_US = 1000


def _common(seconds: int, hist_us: int, histfile: str) -> list[str]:
    return ["cyclictest", "-m", "-q", "-i", str(INTERVAL_US), "-h", str(hist_us),
            "-D", str(seconds), f"--histfile={histfile}"]


def pinned_argv(seconds: int, priority: int, cpu: int, hist_us: int, histfile: str
                ) -> list[str]:
    """One SCHED_FIFO measuring thread pinned on one CPU: the latency guest's RT task."""
    return _common(seconds, hist_us, histfile) + [f"-p{priority}", "-a", str(cpu), "-t", "1"]


def smp_argv(seconds: int, priority: int, hist_us: int, histfile: str) -> list[str]:
    """One measuring thread per CPU, pinned (--smp); priority 0 means SCHED_OTHER."""
    policy = ["--policy=other"] if priority == 0 else [f"-p{priority}"]
    return _common(seconds, hist_us, histfile) + ["--smp"] + policy


@dataclass(frozen=True)
class Histogram:
    """Latency counts per microsecond, summed over the measuring threads."""

    counts: tuple[int, ...]  # counts[us]
    overflow: int  # samples above the last bucket
    max_us: int  # the largest latency seen by any thread (exact, overflow included)
    threads: int

    @property
    def samples(self) -> int:
        return sum(self.counts) + self.overflow

    def percentile(self, q: float) -> int | None:
        """Smallest latency at or below which a share q of samples lies; None if in overflow."""
        want = q * self.samples
        seen = 0
        for us, n in enumerate(self.counts):
            seen += n
            if seen >= want and n:
                return us
        return None


def merge(hists: Iterable[Histogram]) -> Histogram:
    """One histogram of several runs (rounds of one mode): counts add, the max is the max."""
    hists = list(hists)
    if not hists:
        raise ValueError("nothing to merge")
    width = max(len(h.counts) for h in hists)
    counts = [0] * width
    for h in hists:
        for us, n in enumerate(h.counts):
            counts[us] += n
    return Histogram(tuple(counts), sum(h.overflow for h in hists),
                     max(h.max_us for h in hists), max(h.threads for h in hists))


def _row(line: str) -> list[int]:
    return [int(x) for x in line.split(":", 1)[1].split()]


def parse_histogram(text: str) -> Histogram:
    """Parse a --histfile. Raises ValueError when there are no result lines: an unknown
    option makes cyclictest print its usage and exit 0 without measuring anything."""
    counts: list[int] = []
    overflow: Sequence[int] = ()
    maxima: Sequence[int] = ()
    threads = 0
    for line in text.splitlines():
        if line.startswith("# Histogram Overflows:"):
            overflow = _row(line)
        elif line.startswith("# Max Latencies:"):
            maxima = _row(line)
        elif line[:1].isdigit():
            fields = [int(x) for x in line.split()]
            us, per_thread = fields[0], fields[1:]
            threads = max(threads, len(per_thread))
            while len(counts) <= us:
                counts.append(0)
            counts[us] += sum(per_thread)
    if not counts or not maxima:
        raise ValueError("no cyclictest result lines (did it reject an option?)")
    return Histogram(tuple(counts), sum(overflow), max(maxima), threads)


@dataclass(frozen=True)
class Summary:
    p50: int | None
    p99: int | None
    p999: int | None
    max_us: int
    samples: int


def summarize(hist: Histogram) -> Summary:
    return Summary(hist.percentile(0.50), hist.percentile(0.99), hist.percentile(0.999),
                   hist.max_us, hist.samples)
