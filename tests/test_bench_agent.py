"""The agent benchmarks (bench/agent_*.py) in tiny configurations, so they cannot rot.

Each runs as a subprocess for a few seconds with few threads. The assertions are
on the printed figures being there and sane (finite, positive, counts adding
up), never on speed: this machine is shared and the targets are for full runs.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the agent benchmarks need root (SCHED_FIFO, proc "
                                       "connector, pid limits)")


def run_bench(name: str, *args: str, timeout: float = 120) -> str:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", name), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out.stdout


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    value = float(m.group(1))
    assert math.isfinite(value), text
    return value


def test_steady_prints_cpu_rss_and_the_agents_own_sweep_figures():
    out = run_bench("agent_steady.py", "--threads", "50", "--window", "1", "--repeat", "2",
                    "--settle", "0.5")
    assert "== 50 extra threads" in out
    assert 0 <= number(r"cpu: median ([\d.]+) % of one CPU over 2 windows", out) < 100
    assert "(target <= 0.5 %)" in out
    assert number(r"churn: ([\d.]+) tasks/s created on this machine by other work", out) >= 0
    assert re.search(r"wake-ups by source .*: .*observer:", out), out
    assert 5 < number(r"rss: median ([\d.]+) MiB", out) < 1000
    assert "(target <= 40 MB)" in out
    assert number(r"last sweep ([\d.]+) ms", out) > 0
    assert number(r"sweep interval (\d+) ms", out) >= 100  # the default floor
    assert number(r"naive: one /proc/\*/task/\*/stat parse costs ([\d.]+) ms", out) > 0
    assert re.search(r"log: \d+ warning/error lines", out)


def test_latency_times_boost_and_unboost_through_the_region():
    out = run_bench("agent_latency.py", "--threads", "50", "--trials", "5", "--pause-ms", "20")
    p50 = number(r"boost over 5 trials: p50 ([\d.]+) ms", out)
    p99 = number(r"boost over 5 trials: p50 [\d.]+ ms, p99 ([\d.]+) ms", out)
    assert 0 < p50 <= p99 < 10_000
    assert number(r"unboost \(hold 0\) over 5 trials: p50 ([\d.]+) ms", out) > 0
    assert "(target p99 <= 100 ms)" in out
    assert number(r"lost: (\d+)", out) == 0


def test_publish_times_region_and_channel_beside_the_naive_rewrite():
    out = run_bench("agent_publish.py", "--vcpus", "2,8", "--iterations", "300",
                    "--trials", "20")
    for nr in (2, 8):
        assert 0 < number(rf"region {nr} vCPUs: publish p99 ([\d.]+) us", out) < 1e6
        assert number(rf"region {nr} vCPUs: .* naive rewrite is ([\d.]+)x", out) > 0
        assert 0 < number(rf"channel {nr} vCPUs over 20 trials: p50 ([\d.]+) ms", out) < 5000
        assert number(rf"channel {nr} vCPUs over 20 trials: .* lost (\d+)", out) == 0


def test_soak_counts_probes_rss_growth_and_log_lines():
    out = run_bench("agent_soak.py", "--minutes", "0.15", "--threads", "100", "--churn", "50",
                    "--probe-rate", "1", "--settle", "1")
    seen = number(r"probes: (\d+) of \d+ FIFO probe threads", out)
    started = number(r"probes: \d+ of (\d+) FIFO probe threads", out)
    assert started >= 5 and 0 <= seen <= started
    assert number(r"([\d.]+) thread births\+deaths/s achieved", out) > 0
    assert abs(number(r"growth (-?[\d.]+) MB", out)) < 1000
    assert re.search(r"log: \d+ warning/error lines", out)


def test_detect_prints_latency_and_cpu_per_rt_thread_beside_targets():
    out = run_bench("observe_detect.py", "--threads", "50", "--trials", "5", "--quiet-s", "1",
                    "--max-pause-ms", "20")
    p50 = number(r"detection over 5 trials: p50 ([\d.]+) ms", out)
    assert 0 <= p50 <= number(r"detection over 5 trials: p50 [\d.]+ ms, p99 ([\d.]+) ms", out)
    assert number(r"observer CPU: steady ([\d.]+)% of one CPU", out) >= 0
    assert number(r"CPU per new RT thread: ([\d.]+) ms beyond the steady share, beside the "
                  r"periodic sweeps", out) >= 0
    assert "(target <= 0.5 ms)" in out and "(target <= 0.5%)" in out
    assert number(r"naive way, a sweep per new RT thread: ([\d.]+) ms median", out) > 0
