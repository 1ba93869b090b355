"""The benchmark's table, ratios between modes, targets (pure) and its PNG histogram."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .cyclictest import Histogram, Summary

MODES = ("idle", "hogs", "agent")
MODE_TITLES = {
    "idle": "host idle",
    "hogs": "CPU hog on every host CPU, no guestagent",
    "agent": "same hogs, guestagent + host peer",
}


def _us(v: int | None, hist_us: int) -> str:
    return f">{hist_us}" if v is None else str(v)


def table(results: Mapping[str, Mapping[str, Summary]], hist_us: int) -> str:
    """results[mode][side] with side "guest" or "host"."""
    lines = [f"{'mode':<6} {'side':<6} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>8} {'samples':>9}"]
    for mode in MODES:
        for side in ("guest", "host"):
            s = results.get(mode, {}).get(side)
            if s is None:
                continue
            lines.append(f"{mode:<6} {side:<6} {_us(s.p50, hist_us):>8} "
                         f"{_us(s.p99, hist_us):>8} {s.max_us:>8} {s.samples:>9}")
    return "\n".join(lines)


_ABSENT = object()


def _ratio(a: object, b: object) -> float | None:
    if isinstance(a, int) and isinstance(b, int) and b > 0:
        return a / b
    return None


def ratios(results: Mapping[str, Mapping[str, Summary]]) -> list[str]:
    """p99 ratios between modes, each beside its target from the issue."""
    def p99(mode: str, side: str) -> object:
        s = results.get(mode, {}).get(side)
        return _ABSENT if s is None else s.p99

    checks = [
        ("guest p99 hogs / idle", p99("hogs", "guest"), p99("idle", "guest"), None),
        ("guest p99 agent / idle", p99("agent", "guest"), p99("idle", "guest"), ("<=", 1.5)),
        ("guest p99 hogs / agent", p99("hogs", "guest"), p99("agent", "guest"), (">=", 3.0)),
        ("host p99 hogs / idle", p99("hogs", "host"), p99("idle", "host"), None),
        ("host p99 agent / idle", p99("agent", "host"), p99("idle", "host"), ("<=", 2.0)),
    ]
    out = []
    for name, a, b, target in checks:
        if a is _ABSENT or b is _ABSENT:
            continue  # a mode that was not run
        r = _ratio(a, b)
        if r is None:
            out.append(f"{name:<24} {'n/a':>7}   (a p99 beyond the histogram range)")
            continue
        line = f"{name:<24} {r:>6.2f}x"
        if target:
            op, bound = target
            met = r <= bound if op == "<=" else r >= bound
            line += f"   target {op} {bound}x: {'met' if met else 'NOT met'}"
        out.append(line)
    return out


def write_png(path: str, hists: Mapping[str, Mapping[str, Histogram]], title: str) -> None:
    """Two panels (guest, host), one step histogram per mode, log count axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a test machine
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 7))
    for ax, side in zip(axes, ("guest", "host")):
        for mode in MODES:
            h = hists.get(mode, {}).get(side)
            if h is None:
                continue
            top = max((us for us, n in enumerate(h.counts) if n), default=0)
            xs = range(top + 1)
            ax.step(list(xs), [h.counts[x] for x in xs], where="mid",
                    label=f"{MODE_TITLES[mode]} (overflow {h.overflow})")
        ax.set_yscale("log")
        ax.set_xscale("log")  # latencies span 10 µs to tens of ms under TCG
        ax.set_xlim(left=1)
        ax.set_xlabel("latency (µs)")
        ax.set_ylabel("samples")
        ax.set_title(f"cyclictest on the {side}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
