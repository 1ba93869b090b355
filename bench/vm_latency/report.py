"""The benchmark's tables, its PNG, and docs/performance.md (text building is pure)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .cyclictest import Histogram
from .figures import ModeFigures
from .timeline import Segment, Window, class_of, thread_order

MODES = ("idle", "none", "static", "guestagent", "unbudgeted", "isolated")
MODE_TITLES = {
    "idle": "idle: no host load",
    "none": "none: host load, nothing boosted",
    "static": "static: every vCPU + main loop FIFO 1",
    "guestagent": "guestagent: hints, host service",
    "unbudgeted": "unbudgeted: hints, no budget in reach",
    "isolated": "isolated: vCPU 1 + main loop alone on a CPU",
}
SIDE_TITLES = {
    "guest": "latency guest (FIFO 95, vCPU 1)",
    "host_rt": "host, below the peer's cap",
    "host_other": "host, SCHED_OTHER",
}


def _us(v: int | None, hist_us: int) -> str:
    return f">{hist_us}" if v is None else f"{v:,}"


def latency_table(figures: Mapping[str, ModeFigures], hist_us: int) -> str:
    lines = [f"{'mode':<11} {'cyclictest':<28} {'p50 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9} "
             f"{'max µs':>9} {'samples':>8}  p99 per round"]
    for mode, fig in figures.items():
        for side, s in fig.summaries.items():
            rounds = ("/".join(_us(p, hist_us) for p in fig.guest_p99_rounds)
                      if side == "guest" else "")
            lines.append(f"{mode:<11} {SIDE_TITLES.get(side, side):<28} {_us(s.p50, hist_us):>8} "
                         f"{_us(s.p99, hist_us):>8} {_us(s.p999, hist_us):>9} "
                         f"{s.max_us:>9,} {s.samples:>8}  {rounds}")
    return "\n".join(lines)


def host_table(figures: Mapping[str, ModeFigures]) -> str:
    """Host throughput, the share of each mode's time each QEMU thread ran RT, and the
    CPU each used (what a budget's share must cover for the boost to stay)."""
    threads = thread_order(n for f in figures.values() for n, share in f.boosted.items()
                           if share > 0 or not _is_other_thread(n))
    head = f"{'mode':<11} {'work/s':>9} {'load CPUs':>9}  time RT: "
    lines = [head + "  ".join(f"{t:>12}" for t in threads)]
    for mode, fig in figures.items():
        cells = "  ".join(f"{fig.boosted.get(t, 0.0):>11.0%} " for t in threads)
        lines.append(f"{mode:<11} {fig.work_per_s:>9,.0f} {fig.load_cpus:>9.2f}  "
                     f"{'':9}{cells}")
    if any(f.cpu for f in figures.values()):
        lines += ["", f"{'mode':<11} CPU used: " + "  ".join(f"{t:>12}" for t in threads)]
        for mode, fig in figures.items():
            cells = "  ".join(f"{fig.cpu[t]:>12.2f}" if t in fig.cpu else f"{'-':>12}"
                              for t in threads)
            lines.append(f"{mode:<11} {'':10}{cells}")
    vcpus = sorted({v for f in figures.values() for v in f.guest_busy})
    if vcpus:
        lines += ["", f"{'mode':<11} busy in the guest: "
                  + "  ".join(f"{f'vCPU {v}':>8}" for v in vcpus)]
        for mode, fig in figures.items():
            cells = "  ".join(f"{fig.guest_busy[v]:>7.0%} " if v in fig.guest_busy
                              else f"{'-':>8}" for v in vcpus)
            lines.append(f"{mode:<11} {'':19}{cells}")
    return "\n".join(lines)


def _is_other_thread(name: str) -> bool:
    return "[" in name  # worker threads are named "comm [tid]"


def _seconds(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f}"


def delay_lines(figures: Mapping[str, ModeFigures], mode: str = "guestagent") -> list[str]:
    fig = figures.get(mode)
    if fig is None:
        return []
    out = []
    for what, delays in (("vCPU 1 thread", fig.boost_delays),
                         ("main loop thread", fig.emulator_delays)):
        seen = [d for d in delays if d is not None]
        median = f"median {statistics.median(seen):.2f} s" if seen else "never boosted"
        out.append(f"{mode}: guest RT task started -> {what} RT on the host: "
                   f"{', '.join(_seconds(d) for d in delays)} s ({median})")
    return out


# --- the picture -----------------------------------------------------------------------------

CLASS_COLOURS = {"RT": "tab:red", "nice < 0": "tab:orange", "normal": "lightgrey",
                 "nice > 0": "tab:blue"}


def write_png(path: str, figures: Mapping[str, ModeFigures],
              timeline: Mapping[str, Sequence[Segment]], windows: Sequence[Window],
              title: str) -> None:
    """Three histogram panels (guest, host FIFO, host OTHER), then the QEMU threads'
    scheduling class across the run with each mode's windows marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a test machine
    import matplotlib.pyplot as plt

    sides = list(SIDE_TITLES)
    fig, axes = plt.subplots(len(sides) + 1, 1, figsize=(11, 13),
                             gridspec_kw={"height_ratios": [3] * len(sides) + [2]})
    for ax, side in zip(axes, sides):
        for mode, f in figures.items():
            h = f.hists.get(side)
            if h is not None:
                _step(ax, h, f"{MODE_TITLES.get(mode, mode)} (overflow {h.overflow})")
        ax.set_yscale("log")
        ax.set_xscale("log")  # latencies span 1 µs to tens of ms under TCG
        ax.set_xlim(left=1)
        ax.set_xlabel("latency (µs)")
        ax.set_ylabel("share of samples")
        ax.set_title(f"cyclictest: {SIDE_TITLES[side]}")
        ax.legend(fontsize=7)
    _timeline(axes[-1], timeline, windows)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def log_bins(h: Histogram, per_decade: int = 20) -> tuple[list[float], list[float]]:
    """Bin edges spaced evenly on a log axis from 1 µs, and the share of all samples
    (overflow included) in each bin: modes with different sample counts compare."""
    top = max((us for us, n in enumerate(h.counts) if n), default=0)
    edges: list[float] = [1.0]
    while edges[-1] <= top:
        edges.append(edges[-1] * 10 ** (1 / per_decade))
    shares = [0.0] * (len(edges) - 1)
    total = h.samples or 1
    b = 0
    for us, n in enumerate(h.counts):
        if not n:
            continue
        while b + 1 < len(edges) - 1 and us >= edges[b + 1]:
            b += 1
        shares[b] += n / total  # 0 µs lands in the first bin
    return edges, shares


def _step(ax, h: Histogram, label: str) -> None:
    edges, shares = log_bins(h)
    if shares:
        ax.stairs(shares, edges, label=label)


def _timeline(ax, timeline: Mapping[str, Sequence[Segment]], windows: Sequence[Window]
              ) -> None:
    names = [n for n in thread_order(timeline)
             if not _is_other_thread(n) or any(s.boosted for s in timeline[n])]
    t0 = min((w.start for w in windows), default=0.0)
    for row, name in enumerate(names):
        for cls, colour in CLASS_COLOURS.items():
            bars = [(s.start - t0, s.end - s.start) for s in timeline[name]
                    if class_of(s.label) == cls]
            if bars:
                ax.broken_barh(bars, (row - 0.4, 0.8), color=colour)
    for w in windows:
        ax.axvspan(w.start - t0, w.end - t0, color="black", alpha=0.06)
        ax.text((w.start + w.end) / 2 - t0, len(names) - 0.4, f"{w.mode}\n{w.round}",
                ha="center", va="bottom", fontsize=6)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_ylim(-0.6, len(names) + 0.6)
    ax.set_xlabel("seconds since the first measured window (shaded: measured windows)")
    ax.set_title("QEMU threads' scheduling class on the host")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=cls) for cls, c in CLASS_COLOURS.items()],
              fontsize=7, loc="lower right")


# --- docs/performance.md -----------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    command: str
    when: str  # UTC date and time
    machine: Sequence[str]  # lines describing the host and the guest
    duration_s: float
    tables: Sequence[str]  # preformatted blocks
    targets: Sequence[str]
    references: Sequence[str]
    delays: Sequence[str]
    png: str  # path relative to docs/
    full: bool = True  # every mode, the full length and rounds (else recorded with --record)
    note: str = ""  # why this length (--note), when it is not the default


METHOD = """\
One guest (2 vCPUs, booted once) and six modes that take turns, interleaved, each round
starting one mode later:

- `idle`: no host load, the least latency this machine gives;
- `none`: the host load, nothing boosted;
- `static`: the host load; every vCPU thread and QEMU's main loop SCHED_FIFO 1 for the
  whole window, as OpenStack Nova (`hw:cpu_realtime`), KubeVirt's realtime mode and
  libvirt's `<vcpusched>` do it;
- `guestagent`: the host load; `guestagent run` in the guest, `guestagent-host serve`
  beside QEMU with its default limits and budgets (per thread, a bucket of 0.5 s of
  boosted run time earned at 0.5 s per second: half a CPU at RT over time) and its
  default emulator policy, which under TCG boosts QEMU's main loop while a vCPU is
  boosted;
- `unbudgeted`: as `guestagent`, with `boost_budget = 3600` seconds, a budget no window
  spends: what the hints alone give, apart from what the budget (a host-side safety
  limit against a guest that boosts and spins) takes back;
- `isolated`: vCPU 1's thread and the main loop alone on the last CPU, the host load and
  QEMU's other threads on the others: what an isolated CPU gives.

- **Host load**: busy workers pinned to every CPU the vCPU threads run on, more of them
  than CPUs, each counting the work it does (one unit = 20,000 iterations of an empty
  Python loop): *work/s* is the host's batch throughput, *load CPUs* the CPU time it got.
- **Latency guest**: `cyclictest` at FIFO 95 pinned on vCPU 1, 1 ms interval, while a
  nice-19 busy loop runs on vCPU 0, so hints must boost one vCPU and lower the other.
- **Host latency work**: two `cyclictest --smp` at the same time, one at FIFO 30 (below
  the host service's cap, FIFO 40; above static's FIFO 1) and one at SCHED_OTHER.
- **Figures**: latency percentiles from the rounds' histograms pooled per mode; host
  throughput as the median round; *time RT* is the share of a mode's measured time each
  QEMU thread spent at an RT policy, from its policy sampled every 20 ms (the timeline in
  the plot); *CPU used* is the run time each thread got over the mode's measured time
  (from /proc schedstat at the same samples), boosted or not: a thread keeps its boost
  under `guestagent` only while this stays within the budget's share; *busy in the guest*
  is the share of each vCPU's time that the guest's own /proc/stat, read before and after
  each window, counts as not idle: a vCPU thread whose *CPU used* is well above it spends
  the difference in QEMU, not in guest code; the boost delay runs from the guest's command server reporting cyclictest
  started (host clock) to the host seeing the vCPU thread RT, polled every 1 ms.
- **Targets**: ratios of this run. Where a target is out of reach on this machine, the
  line says what the best reference mode gives in guestagent's place (the better of
  `idle` and `static` for guest latency, `none` for the host's figures); the bound is
  never changed.
- **Under TCG** the guest's timer interrupts are run by QEMU's main loop, so a boost
  helps the guest only with the main loop boosted too: static boosts it, and so does
  `serve`'s emulator policy. Each boosted thread spends the host service's budget while
  it runs and earns half a second of it per second, so under `guestagent` a thread that
  needs more than half a CPU has its boost come and go (the stripes in the timeline;
  *time RT* gives the share of the window); static has no budget. (Under KVM the in-kernel LAPIC timer does not go through the
  main loop, and `serve` leaves the main loop alone there by default.)
- A second guest that runs only batch work is not part of the run on a 2-CPU host.
"""


def performance_md(rec: RunRecord) -> str:
    def block(lines: Sequence[str]) -> list[str]:
        return ["```", *lines, "```", ""]

    out = [
        "# Performance: hints against static real-time and against nothing",
        "",
        "Written by the last full run of `bench/vm_latency`; every full run replaces this",
        "file and `performance.png` beside it.",
        "",
        *([] if rec.full else [
            "**This record is of a short run** (`--record`), not a full one: shorter windows",
            "or fewer rounds than the defaults, so its figures are noisier.", ""]),
        f"- command: `{rec.command}`",
        f"- run: {rec.when}, {rec.duration_s / 60:.0f} min",
        *([f"- why this length: {rec.note}"] if rec.note else []),
        *[f"- {line}" for line in rec.machine],
        "",
        "## Targets (ratios from this run)",
        "",
        *block(rec.targets),
        "## For reading them: what the load costs, what isolation and the budget give",
        "",
        *block(rec.references),
        "## Figures",
        "",
    ]
    for table in rec.tables:
        out += block(table.splitlines())
    if rec.delays:
        out += ["## How fast a boost arrives", "", *block(rec.delays)]
    out += ["## Plot", "", f"![latency histograms and thread timeline]({rec.png})", "",
            "## Method", "", METHOD]
    return "\n".join(out)
