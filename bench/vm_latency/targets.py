"""The benchmark's targets, as ratios between modes of one run, and whether each is in
physical reach on this machine (pure).

A target compares ``guestagent`` with another mode. Its *reach* puts in guestagent's place
the best figure of the modes that bound what any hint policy could give: for the guest's
latency the better of ``idle`` (nothing else on the host) and ``static`` (everything
boosted); for the host's figures ``none`` (nothing boosted costs the host least). Where
even that misses the bound, the target is out of reach on this machine, and the line says
so with that figure; the bound itself is never changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .figures import ModeFigures

SUBJECT = "guestagent"


@dataclass(frozen=True)
class Metric:
    side: str  # "guest", "host_rt", "host_other", or "load" for host throughput
    field: str  # "p99", "work_per_s", ...
    title: str
    higher_is_better: bool = False

    def of(self, figures: ModeFigures) -> float | None:
        if self.side == "load":
            return getattr(figures, self.field)
        summary = figures.summaries.get(self.side)
        return None if summary is None else getattr(summary, self.field)


GUEST_P99 = Metric("guest", "p99", "guest p99")
HOST_RT_P99 = Metric("host_rt", "p99", "host p99 (FIFO)")
HOST_OTHER_P99 = Metric("host_other", "p99", "host p99 (SCHED_OTHER)")
HOST_WORK = Metric("load", "work_per_s", "host work/s", higher_is_better=True)


@dataclass(frozen=True)
class Target:
    metric: Metric
    numerator: str  # mode
    denominator: str  # mode
    op: str  # "<=" or ">="
    bound: float
    references: tuple[str, ...]  # the modes whose best figure stands in for guestagent

    @property
    def name(self) -> str:
        return f"{self.metric.title} {self.numerator} / {self.denominator}"


TARGETS = (
    # Boosting what static boosts reaches static's latency: always in reach.
    Target(GUEST_P99, SUBJECT, "static", "<=", 1.25, ()),
    Target(GUEST_P99, "none", SUBJECT, ">=", 3.0, ("idle", "static")),
    Target(HOST_WORK, SUBJECT, "static", ">=", 1.5, ("none",)),
    Target(HOST_OTHER_P99, SUBJECT, "static", "<=", 0.5, ("none",)),
    Target(HOST_RT_P99, SUBJECT, "static", "<=", 0.5, ("none",)),
)

# Ratios printed for reading the targets by: what the load costs, what isolation gives.
REFERENCES = (
    (GUEST_P99, "none", "idle"),
    (GUEST_P99, "static", "idle"),
    (GUEST_P99, SUBJECT, "idle"),
    (GUEST_P99, "isolated", "idle"),
    # The hints without the budget: how much of guestagent's gap to static is the budget's.
    (GUEST_P99, "unbudgeted", "static"),
    (GUEST_P99, "none", "unbudgeted"),
    (HOST_WORK, "unbudgeted", "static"),
    (HOST_RT_P99, "unbudgeted", "static"),
    (HOST_WORK, "none", "static"),
    (HOST_WORK, "isolated", "static"),
    (HOST_OTHER_P99, "none", "idle"),
    (HOST_OTHER_P99, "static", "idle"),
)


def _value(metric: Metric, figures: Mapping[str, ModeFigures], mode: str) -> float | None:
    return metric.of(figures[mode]) if mode in figures else None


def _ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None or y <= 0 else x / y


def ratio(metric: Metric, figures: Mapping[str, ModeFigures], num: str, den: str
          ) -> float | None:
    return _ratio(_value(metric, figures, num), _value(metric, figures, den))


def best(metric: Metric, figures: Mapping[str, ModeFigures], modes: tuple[str, ...]
         ) -> tuple[str, float] | None:
    """The mode among ``modes`` with the best figure, and that figure."""
    found = [(m, v) for m in modes if (v := _value(metric, figures, m)) is not None]
    if not found:
        return None
    pick = max if metric.higher_is_better else min
    return pick(found, key=lambda mv: mv[1])


def _met(op: str, value: float, bound: float) -> bool:
    return value <= bound if op == "<=" else value >= bound


@dataclass(frozen=True)
class Check:
    target: Target
    value: float | None  # None: a mode missing, or a figure beyond the histogram range
    met: bool | None
    reach: float | None  # the ratio with the best reference in guestagent's place
    in_reach: bool | None
    reference: str = ""  # the mode that gave the reach

    def line(self) -> str:
        t = self.target
        head = f"{t.name:<46}"
        if self.value is None:
            return f"{head} {'n/a':>7}   target {t.op} {t.bound}x: not measured"
        text = (f"{head} {self.value:>6.2f}x   target {t.op} {t.bound}x: "
                f"{'met' if self.met else 'NOT met'}")
        if self.in_reach is False:
            text += (f"; out of reach here: {self.reference} in {SUBJECT}'s place gives "
                     f"{self.reach:.2f}x")
        return text


def check(target: Target, figures: Mapping[str, ModeFigures]) -> Check | None:
    """None when neither side of the target was run."""
    if target.numerator not in figures and target.denominator not in figures:
        return None
    value = ratio(target.metric, figures, target.numerator, target.denominator)
    met = None if value is None else _met(target.op, value, target.bound)
    stand_in = best(target.metric, figures, target.references)
    if stand_in is None:
        return Check(target, value, met, None, None)
    mode, figure = stand_in

    def side(m: str) -> float | None:
        return figure if m == SUBJECT else _value(target.metric, figures, m)

    reach = _ratio(side(target.numerator), side(target.denominator))
    return Check(target, value, met, reach,
                 None if reach is None else _met(target.op, reach, target.bound), mode)


def target_lines(figures: Mapping[str, ModeFigures]) -> list[str]:
    return [c.line() for c in (check(t, figures) for t in TARGETS) if c is not None]


def reference_lines(figures: Mapping[str, ModeFigures]) -> list[str]:
    out = []
    for metric, num, den in REFERENCES:
        if num in figures and den in figures:
            r = ratio(metric, figures, num, den)
            name = f"{metric.title} {num} / {den}"
            out.append(f"{name:<46} {'n/a':>7}" if r is None else f"{name:<46} {r:>6.2f}x")
    return out
