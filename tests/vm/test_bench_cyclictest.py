"""bench/vm_latency's parsing and figures, on real cyclictest output from this host.

No guest here: these run in a second or two and guard the benchmark's arithmetic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from testbed.vm import REPO_ROOT

if str(REPO_ROOT) not in sys.path:  # `pytest` (unlike `python3 -m pytest`) omits the cwd
    sys.path.insert(0, str(REPO_ROOT))

from bench.vm_latency.cyclictest import (  # noqa: E402
    Histogram,
    Summary,
    cyclictest_argv,
    parse_histogram,
    summarize,
)
from bench.vm_latency.report import ratios, table, write_png  # noqa: E402

pytestmark = pytest.mark.root

needs_cyclictest = pytest.mark.skipif(
    not shutil.which("cyclictest") or os.geteuid() != 0,
    reason="needs cyclictest (Debian package rt-tests) and root for its RT threads",
)


@needs_cyclictest
def test_real_cyclictest_histogram_parses(tmp_path) -> None:
    hist_file = tmp_path / "h.txt"
    argv = cyclictest_argv(1, 30, 5000, str(hist_file))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    hist = parse_histogram(hist_file.read_text())
    assert hist.threads == len(os.sched_getaffinity(0))  # --smp: one thread per CPU
    assert hist.samples > 300 * hist.threads  # 1 s at 1 ms intervals, on a busy machine
    s = summarize(hist)
    assert s.p50 is not None and s.p50 <= (s.p99 if s.p99 is not None else s.max_us)
    assert s.p50 <= s.max_us


@needs_cyclictest
def test_unknown_option_exits_0_without_results_and_is_refused(tmp_path) -> None:
    # Why the benchmark checks for result lines: cyclictest does not fail on this.
    hist_file = tmp_path / "h.txt"
    argv = cyclictest_argv(1, 30, 5000, str(hist_file)) + ["--no-such-option"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert not hist_file.exists()
    for text in ("", proc.stdout, proc.stderr):
        with pytest.raises(ValueError, match="no cyclictest result lines"):
            parse_histogram(text)


def test_percentiles_count_overflow_as_beyond_the_range() -> None:
    counts = [0] * 30
    counts[10], counts[20] = 50, 49
    hist = Histogram(tuple(counts), overflow=1, max_us=90000, threads=1)
    s = summarize(hist)
    assert (s.p50, s.p99, s.max_us, s.samples) == (10, 20, 90000, 100)
    more = Histogram(tuple(counts), overflow=2, max_us=90000, threads=1)
    assert more.percentile(0.99) is None  # p99 lies in the overflow


def test_histogram_sums_threads_and_takes_the_largest_max() -> None:
    text = ("# Histogram\n000000 000000\t000000\n000001 000003\t000004\n"
            "000002 000001\t000000\n# Total: 000000004 000000004\n"
            "# Max Latencies: 00002 07000\n# Histogram Overflows: 00000 00001\n")
    hist = parse_histogram(text)
    assert hist.counts == (0, 7, 1) and hist.overflow == 1
    assert hist.max_us == 7000 and hist.threads == 2


def _summary(p99: int | None) -> Summary:
    return Summary(p50=1, p99=p99, max_us=max(p99 or 0, 1), samples=100)


def test_ratios_report_targets_met_and_missed() -> None:
    results = {
        "idle": {"guest": _summary(100), "host": _summary(50)},
        "hogs": {"guest": _summary(600), "host": _summary(60)},
        "agent": {"guest": _summary(140), "host": _summary(120)},
    }
    lines = "\n".join(ratios(results))
    assert "guest p99 agent / idle     1.40x   target <= 1.5x: met" in lines
    assert "guest p99 hogs / agent     4.29x   target >= 3.0x: met" in lines
    assert "host p99 agent / idle      2.40x   target <= 2.0x: NOT met" in lines
    assert "idle   guest" in table(results, 20000)


def test_ratios_skip_modes_not_run_and_flag_overflow() -> None:
    results = {"idle": {"guest": _summary(100)}, "hogs": {"guest": _summary(None)}}
    lines = ratios(results)
    assert lines == ["guest p99 hogs / idle        n/a   (a p99 beyond the histogram range)"]
    assert ">20000" in table(results, 20000)


def test_png_is_written(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="the benchmark's plot needs matplotlib")
    hist = Histogram((0, 5, 3, 1), overflow=0, max_us=3, threads=1)
    path = tmp_path / "h.png"
    write_png(str(path), {"idle": {"guest": hist, "host": hist}}, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
