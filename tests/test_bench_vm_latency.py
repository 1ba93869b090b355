"""bench/vm_latency's pure parts: cyclictest output, figures, timeline, targets, report.

No guest here (tests/vm/test_bench_cyclictest.py boots one): these guard the arithmetic
the benchmark's conclusions rest on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import threading
import time
from dataclasses import replace

import pytest

from bench.vm_latency.cyclictest import (
    Histogram,
    merge,
    parse_histogram,
    pinned_argv,
    smp_argv,
    summarize,
)
from bench.vm_latency.figures import (
    LoadSample,
    WindowResult,
    guest_busy,
    load_rate,
    mode_figures,
)
from bench.vm_latency.report import (
    RunRecord,
    delay_lines,
    host_table,
    latency_table,
    log_bins,
    performance_md,
    write_png,
)
from bench.vm_latency.run import full_run_estimate, is_full_run, rounds_order
from bench.vm_latency.targets import TARGETS, check, reference_lines, target_lines
from bench.vm_latency.timeline import (
    MAIN_THREAD,
    ThreadSample,
    Window,
    boosted_by_mode,
    cpu_by_mode,
    boosted_seconds,
    class_of,
    first_boost,
    segments,
    thread_order,
)
from guestagent.linux.procfs import parse_proc_stat_times


def needs_cyclictest(test):
    """Real cyclictest runs: the package, and root for its RT threads."""
    return pytest.mark.root(pytest.mark.skipif(
        not shutil.which("cyclictest"), reason="needs cyclictest (Debian package rt-tests)")(test))


# --- cyclictest ----------------------------------------------------------------------------


@needs_cyclictest
def test_real_pinned_cyclictest_histogram_parses(tmp_path) -> None:
    hist_file = tmp_path / "h.txt"
    argv = pinned_argv(1, 30, 0, 5000, str(hist_file))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    hist = parse_histogram(hist_file.read_text())
    assert hist.threads == 1
    assert hist.samples > 300  # 1 s at 1 ms intervals, on a busy machine
    s = summarize(hist)
    assert s.p50 is not None and s.p50 <= s.max_us


@needs_cyclictest
def test_real_smp_cyclictest_at_sched_other_has_a_thread_per_cpu(tmp_path) -> None:
    hist_file = tmp_path / "h.txt"
    proc = subprocess.run(smp_argv(1, 0, 5000, str(hist_file)), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert parse_histogram(hist_file.read_text()).threads == len(os.sched_getaffinity(0))


@needs_cyclictest
def test_unknown_option_exits_0_without_results_and_is_refused(tmp_path) -> None:
    # Why the benchmark checks for result lines: cyclictest does not fail on this.
    hist_file = tmp_path / "h.txt"
    argv = smp_argv(1, 30, 5000, str(hist_file)) + ["--no-such-option"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert not hist_file.exists()
    for text in ("", proc.stdout, proc.stderr):
        with pytest.raises(ValueError, match="no cyclictest result lines"):
            parse_histogram(text)


def test_argv_policy_and_pinning() -> None:
    assert "--policy=other" in smp_argv(5, 0, 100, "f") and "-p0" not in smp_argv(5, 0, 100, "f")
    assert "-p30" in smp_argv(5, 30, 100, "f")
    pinned = pinned_argv(5, 95, 1, 100, "f")
    assert pinned[pinned.index("-a") + 1] == "1" and pinned[pinned.index("-t") + 1] == "1"
    assert "-p95" in pinned and "--histfile=f" in pinned


def _hist(counts: dict[int, int], overflow: int = 0, max_us: int | None = None) -> Histogram:
    width = max(counts) + 1 if counts else 1
    return Histogram(tuple(counts.get(us, 0) for us in range(width)), overflow,
                     max_us if max_us is not None else max(counts, default=0), 1)


def test_percentiles_count_overflow_as_beyond_the_range() -> None:
    s = summarize(_hist({10: 50, 20: 49}, overflow=1, max_us=90000))
    assert (s.p50, s.p99, s.p999, s.max_us, s.samples) == (10, 20, None, 90000, 100)
    assert _hist({10: 50, 20: 48}, overflow=2).percentile(0.99) is None


def test_p999_is_its_own_figure() -> None:
    s = summarize(_hist({5: 998, 7: 1, 900: 1}))
    assert (s.p99, s.p999, s.max_us) == (5, 7, 900)


def test_histogram_sums_threads_and_takes_the_largest_max() -> None:
    text = ("# Histogram\n000000 000000\t000000\n000001 000003\t000004\n"
            "000002 000001\t000000\n# Total: 000000004 000000004\n"
            "# Max Latencies: 00002 07000\n# Histogram Overflows: 00000 00001\n")
    hist = parse_histogram(text)
    assert hist.counts == (0, 7, 1) and hist.overflow == 1
    assert hist.max_us == 7000 and hist.threads == 2


def test_merge_adds_counts_of_different_widths() -> None:
    merged = merge([_hist({1: 2}, overflow=1, max_us=500), _hist({3: 4}, max_us=3)])
    assert merged.counts == (0, 2, 0, 4) and merged.overflow == 1 and merged.max_us == 500
    with pytest.raises(ValueError):
        merge([])


# --- figures -------------------------------------------------------------------------------


def test_load_rate() -> None:
    assert load_rate(LoadSample(10.0, 100, 1.0), LoadSample(12.0, 700, 4.0)) == (300.0, 1.5)
    with pytest.raises(ValueError):
        load_rate(LoadSample(2.0, 0, 0), LoadSample(2.0, 1, 0))


def _window(mode: str, round_: int, guest: dict[int, int], work: float,
            delay: float | None = None) -> WindowResult:
    h = _hist(guest)
    return WindowResult(mode, round_, 5.0, {"guest": h, "host_rt": h, "host_other": h},
                        work, work / 1000, delay, None)


def test_mode_figures_pool_latency_and_take_the_median_round() -> None:
    windows = [_window("none", 0, {100: 99, 900: 1}, 10.0),
               _window("static", 0, {50: 100}, 1.0),
               _window("none", 1, {100: 100}, 30.0),
               _window("none", 2, {200: 100}, 20.0)]
    figs = mode_figures(windows, {"none": {"CPU 1/TCG": 0.25}})
    assert list(figs) == ["none", "static"]
    none = figs["none"]
    assert none.rounds == 3 and none.work_per_s == 20.0
    assert none.summaries["guest"].samples == 300 and none.summaries["guest"].max_us == 900
    assert none.summaries["guest"].p50 == 100 and none.summaries["guest"].p99 == 200
    assert none.guest_p99_rounds == (100, 100, 200)
    assert none.boosted == {"CPU 1/TCG": 0.25} and figs["static"].boosted == {}


def test_guest_busy_is_each_vcpus_share_not_idle_by_the_guests_count() -> None:
    #                user nice system idle iowait irq softirq steal
    before = ("cpu  10 0 0 10 0 0 0 0\n"
              "cpu0 0 100 0 50 0 0 0 0\ncpu1 5 0 5 500 10 0 0 0\nintr 5 0\n")
    after = ("cpu  99 0 0 99 0 0 0 0\n"
             "cpu0 0 199 1 50 0 0 0 0\ncpu1 10 0 10 580 20 0 0 0\nintr 9 0\n")
    first, last = parse_proc_stat_times(before), parse_proc_stat_times(after)
    # vCPU 1: 10 of 100 ticks busy, iowait counted as idle
    assert guest_busy(first, last) == pytest.approx({0: 1.0, 1: 0.1})
    assert guest_busy(first, first) == {}, "no ticks passed: no figure"
    assert guest_busy({}, last) == {}


def test_mode_figures_average_the_guest_busy_share_over_rounds() -> None:
    windows = [replace(_window("none", r, {100: 1}, 1.0), guest_busy=busy)
               for r, busy in enumerate(({0: 1.0, 1: 0.2}, {0: 0.8, 1: 0.4}, {1: 0.3}))]
    figs = mode_figures(windows)
    assert figs["none"].guest_busy == pytest.approx({1: 0.3}), "only vCPUs every round read"
    text = host_table(figs).split("busy in the guest:")[1]
    assert "vCPU 1" in text and "30%" in text and "vCPU 0" not in text


# --- timeline ------------------------------------------------------------------------------


def _s(t: float, name: str, policy: int = 0, prio: int = 0, nice: int = 0) -> ThreadSample:
    return ThreadSample(t, 1, name, policy, prio, nice)


def test_labels_and_classes() -> None:
    assert _s(0, "x", 1, 40).label == "fifo 40" and _s(0, "x", 1, 40).boosted
    assert _s(0, "x", 0, 0, 10).label == "other nice 10"
    assert _s(0, "x").label == "other" and not _s(0, "x").boosted
    assert [class_of(lb) for lb in ("fifo 1", "rr 3", "other nice -5", "other nice 10",
                                    "other", "batch")] == \
        ["RT", "RT", "nice < 0", "nice > 0", "normal", "normal"]


def test_segments_merge_runs_and_hold_until_the_next_sample() -> None:
    samples = [_s(0.0, "m"), _s(1.0, "m"), _s(2.0, "m", 1, 1), _s(3.0, "m", 1, 1),
               _s(4.0, "m"), _s(0.5, "v", 1, 40)]
    runs = segments(samples, end=5.0)
    assert [(r.start, r.end, r.label) for r in runs["m"]] == \
        [(0.0, 2.0, "other"), (2.0, 4.0, "fifo 1"), (4.0, 5.0, "other")]
    assert [(r.start, r.end) for r in runs["v"]] == [(0.5, 5.0)]
    assert boosted_seconds(runs["m"], 0.0, 5.0) == 2.0
    assert boosted_seconds(runs["m"], 3.5, 10.0) == 0.5  # clipped to the window


def test_cpu_by_mode_is_run_time_over_each_window() -> None:
    def run(t: float, name: str, ran_s: float) -> ThreadSample:
        return ThreadSample(t, 1, name, 1, 1, 0, int(ran_s * 1e9))
    # "v" runs 60 % of the first window and 20 % of the second; samples outside the
    # windows (the 3 s gap between them, where it ran flat out) do not count.
    samples = [run(0.0, "v", 0.0), run(5.0, "v", 3.0), run(8.0, "v", 6.0),
               run(10.0, "v", 6.0), run(20.0, "v", 8.0), run(1.0, "lone", 0.0),
               ThreadSample(2.0, 1, "unread", 0, 0, 0)]
    windows = [Window("static", 0, 0.0, 5.0), Window("static", 1, 10.0, 20.0),
               Window("none", 0, 5.5, 7.0)]
    cpu = cpu_by_mode(samples, windows)
    assert cpu["static"] == {"v": pytest.approx(5.0 / 15.0)}
    assert cpu["none"] == {}  # fewer than two samples in the window


def test_a_thread_that_exited_is_not_held_to_the_end() -> None:
    """A worker last seen at FIFO that then exited counted as RT in every later mode."""
    samples = [_s(t / 10, "m") for t in range(50)] + [_s(0.0, "w", 1, 1), _s(0.1, "w", 1, 1)]
    runs = segments(samples, end=5.0, gone_after=0.5)
    assert [(r.start, r.end, r.label) for r in runs["w"]] == [(0.0, 0.1, "fifo 1")]
    assert runs["m"][-1].end == 5.0
    held = segments(samples, end=5.0)  # without gone_after: sample-and-hold to the end
    assert held["w"][-1].end == 5.0


def test_boosted_by_mode_is_a_share_of_the_modes_windows() -> None:
    samples = [_s(0.0, "m"), _s(10.0, "m", 1, 1), _s(20.0, "m")]
    timeline = segments(samples, end=30.0)
    windows = [Window("none", 0, 0.0, 10.0), Window("static", 0, 10.0, 20.0),
               Window("static", 1, 25.0, 30.0)]
    shares = boosted_by_mode(timeline, windows)
    assert shares["none"]["m"] == 0.0
    assert shares["static"]["m"] == pytest.approx(10.0 / 15.0)


def test_first_boost_after_a_time() -> None:
    samples = [_s(1.0, "v", 1, 40), _s(5.0, "v"), _s(7.0, "v", 1, 40), _s(8.0, "w", 1, 1)]
    assert first_boost(samples, "v", 2.0) == 7.0
    assert first_boost(samples, "v", 7.5) is None


def test_thread_order_main_then_vcpus_then_the_rest() -> None:
    assert thread_order(["worker [9]", "CPU 10/TCG", "CPU 2/TCG", MAIN_THREAD, "CPU 2/TCG"]) \
        == [MAIN_THREAD, "CPU 2/TCG", "CPU 10/TCG", "worker [9]"]


# --- targets -------------------------------------------------------------------------------


def _figures(guest_p99: dict[str, int], work: dict[str, float], host_p99: int = 100):
    windows = []
    for mode, p99 in guest_p99.items():
        h = _hist({p99: 100})
        host = _hist({host_p99 * (4 if mode == "static" else 1): 100})
        windows.append(WindowResult(mode, 0, 1.0, {"guest": h, "host_rt": host,
                                                   "host_other": host}, work[mode], 1.0))
    return mode_figures(windows)


def test_targets_met_and_missed_with_their_ratios() -> None:
    figs = _figures({"idle": 500, "none": 6000, "static": 1000, "guestagent": 1200},
                    {"idle": 0, "none": 1000, "static": 300, "guestagent": 600})
    lines = target_lines(figs)
    assert lines[0].startswith("guest p99 guestagent / static") and "1.20x" in lines[0]
    assert "target <= 1.25x: met" in lines[0] and "out of reach" not in lines[0]
    assert "5.00x   target >= 3.0x: met" in lines[1]
    assert "2.00x   target >= 1.5x: met" in lines[2]
    assert "0.25x   target <= 0.5x: met" in lines[3]  # host p99 400 under static, 100 else


def test_a_target_out_of_reach_says_what_the_best_reference_gives() -> None:
    # The load costs the guest only 1.6x: no policy can make "none" 3x worse than itself.
    figs = _figures({"idle": 1000, "none": 1600, "static": 900, "guestagent": 950},
                    {"idle": 0, "none": 400, "static": 300, "guestagent": 350})
    c = check(TARGETS[1], figs)
    assert c.met is False and c.in_reach is False and c.reference == "static"
    assert c.reach == pytest.approx(1600 / 900)
    assert "out of reach here: static in guestagent's place gives 1.78x" in c.line()
    work = check(TARGETS[2], figs)  # none/static = 1.33 < 1.5: out of reach as well
    assert work.met is False and work.in_reach is False and work.reference == "none"


def test_targets_with_a_mode_missing_or_beyond_the_range() -> None:
    figs = _figures({"none": 6000, "static": 1000}, {"none": 1, "static": 1})
    lines = target_lines(figs)
    assert lines[0].endswith("n/a   target <= 1.25x: not measured")
    assert not target_lines(_figures({"idle": 1}, {"idle": 1}))  # no side of any target
    over = mode_figures([WindowResult(
        "guestagent", 0, 1.0, {"guest": _hist({1: 1}, overflow=99)}, 1.0, 1.0)])
    over.update(figs)
    assert "n/a" in check(TARGETS[0], over).line()


def test_reference_lines_only_for_modes_run() -> None:
    figs = _figures({"idle": 500, "none": 1500}, {"idle": 0, "none": 1})
    assert reference_lines(figs) == [f"{'guest p99 none / idle':<46}   3.00x",
                                     f"{'host p99 (SCHED_OTHER) none / idle':<46}   1.00x"]


def test_the_unbudgeted_mode_is_read_against_static_and_none() -> None:
    figs = _figures({"idle": 500, "none": 6000, "static": 1000, "unbudgeted": 1100},
                    {"idle": 0, "none": 1, "static": 1, "unbudgeted": 1})
    lines = reference_lines(figs)
    assert f"{'guest p99 unbudgeted / static':<46}   1.10x" in lines
    assert f"{'guest p99 none / unbudgeted':<46}   5.45x" in lines


@pytest.mark.parametrize("mode", ["guestagent", "unbudgeted"])
def test_each_service_mode_writes_a_config_the_host_service_accepts(tmp_path, mode) -> None:
    from types import SimpleNamespace

    from bench.vm_latency.hostservice import SERVICE_MODES, UNBUDGETED
    from guestagent.host.serviceconfig import load_service

    vm = SimpleNamespace(workdir=tmp_path, peer_qmp_sock="q.sock", hints_sock="h.sock")
    argv = SERVICE_MODES[mode].argv(vm, str(tmp_path / "status"))
    settings = load_service(argv[argv.index("--config") + 1])
    assert settings.arbiter.budget == (UNBUDGETED if mode == "unbudgeted" else 0.5)


# --- report --------------------------------------------------------------------------------


def test_log_bins_share_every_sample_once() -> None:
    h = _hist({0: 1, 1: 10, 9: 10, 10: 10, 11: 5, 999: 4}, overflow=10)
    edges, shares = log_bins(h, per_decade=1)
    assert edges[:4] == pytest.approx([1.0, 10.0, 100.0, 1000.0])
    assert sum(shares) == pytest.approx(40 / 50)  # the overflow is in no bin
    assert shares[0] == pytest.approx(21 / 50) and shares[1] == pytest.approx(15 / 50)


def test_tables_and_delays() -> None:
    figs = mode_figures([_window("guestagent", 0, {100: 10}, 5.0, delay=0.4),
                         _window("guestagent", 1, {100: 10}, 5.0, delay=None)],
                        {"guestagent": {MAIN_THREAD: 0.0, "CPU 1/TCG": 0.9,
                                        "worker [7]": 0.0}})
    text = latency_table(figs, 100000)
    assert "guestagent  latency guest" in text and "100/100" in text
    host = host_table(figs)
    assert "CPU 1/TCG" in host and "90%" in host and "worker [7]" not in host
    assert "CPU used" not in host  # no run times sampled
    static = mode_figures([_window("static", 0, {100: 10}, 5.0)],
                          {"static": {MAIN_THREAD: 1.0, "CPU 1/TCG": 1.0}},
                          {"static": {"CPU 1/TCG": 0.625}})
    used = host_table(static).split("CPU used:")[1]
    assert "0.62" in used and used.count("-") == 1  # the main loop's run time: not read
    delays = delay_lines(figs)
    assert delays[0].endswith("0.40, never s (median 0.40 s)")
    assert delays[1].endswith("(never boosted)")
    assert delay_lines(figs, mode="static") == []


def test_performance_md_names_command_machine_and_plot() -> None:
    text = performance_md(RunRecord("python3 -m bench.vm_latency", "2026-12-01 22:00 UTC",
                                    ["host: 2 CPUs"], 1800.0, ["a table"], ["t1"], ["r1"],
                                    ["d1"], "performance.png"))
    assert "`python3 -m bench.vm_latency`" in text and "- host: 2 CPUs" in text
    assert "30 min" in text and "![latency histograms and thread timeline](performance.png)" \
        in text
    assert text.count("```") % 2 == 0
    assert "why this length" not in text


def test_performance_md_says_why_a_run_has_its_length() -> None:
    text = performance_md(RunRecord("python3 -m bench.vm_latency --seconds 45", "now",
                                    ["host: 2 CPUs"], 1200.0, ["a table"], ["t1"], ["r1"],
                                    [], "performance.png", full=False,
                                    note="the machine is shared"))
    assert "- why this length: the machine is shared" in text
    assert "**This record is of a short run**" in text


def test_machine_lines_give_the_load_before_and_after(monkeypatch) -> None:
    from bench.vm_latency import run

    monkeypatch.setattr(run.os, "getloadavg", lambda: (3.0, 2.5, 2.0))
    args = argparse.Namespace(load_per_cpu=2)
    host = run.machine_lines("TCG", args, (0.5, 0.25, 0.125))[0]
    assert "0.50 / 0.25 / 0.12 before the run" in host, host
    assert "3.00 / 2.50 / 2.00 after it" in host, host
    assert f"Linux {os.uname().release}" in host


def test_png_is_written(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="the benchmark's plot needs matplotlib")
    figs = mode_figures([_window("none", 0, {5: 3, 300: 1}, 5.0)])
    timeline = segments([_s(0.0, MAIN_THREAD), _s(1.0, MAIN_THREAD, 1, 1)], end=2.0)
    path = tmp_path / "h.png"
    write_png(str(path), figs, timeline, [Window("none", 0, 0.0, 2.0)], "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- run plan ------------------------------------------------------------------------------


def test_rounds_are_interleaved_and_rotated() -> None:
    order = rounds_order(["a", "b", "c"], 3)
    assert [m for _, m in order] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [r for r, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_full_run_and_its_estimate() -> None:
    args = argparse.Namespace(seconds=5, rounds=1)
    every = ["idle", "none", "static", "guestagent", "unbudgeted", "isolated"]
    assert not is_full_run(every, args)
    full = argparse.Namespace(seconds=60, rounds=3)
    assert is_full_run(every, full)
    assert not is_full_run(["idle", "none"], full)
    assert not is_full_run([m for m in every if m != "unbudgeted"], full)
    # 100 s boot, 5 windows of 5 s + 20 s overhead each, 5 s after: full = 105 + 15 * 80
    line = full_run_estimate(230.0, 100.0, 125.0, 5, args, 5)
    assert "took 3.8 min" in line and "20 s of overhead" in line and "about 22 min" in line


def test_guest_text_is_escaped_for_the_terminal() -> None:
    from bench.vm_latency.hostservice import printable

    assert printable("ok\x1b[2J\nnext\r") == "ok\\x1b[2J\nnext\\r"


# --- QEMU's threads, on real threads of this process ---------------------------------------


class _Sleeper:
    """A real thread that sleeps until told to start a child thread or to end."""

    def __init__(self) -> None:
        self.spawn, self.stop = threading.Event(), threading.Event()
        self.tid = self.child_tid = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self._ready.set()
        while not self.stop.wait(0.01):
            if self.spawn.is_set() and not self.child_tid:
                started = threading.Event()
                threading.Thread(target=self._child, args=(started,), daemon=True).start()
                started.wait(10)

    def _child(self, started: threading.Event) -> None:
        self.child_tid = threading.get_native_id()
        started.set()
        self.stop.wait()


@pytest.mark.root
def test_a_thread_left_niced_or_rt_is_found_and_put_back() -> None:
    from bench.vm_latency.qemu_threads import changed_threads, lower

    t = _Sleeper()
    try:
        assert t.tid not in changed_threads(os.getpid())
        os.setpriority(os.PRIO_PROCESS, t.tid, 10)  # what an unboost leaves
        assert t.tid in changed_threads(os.getpid())
        lower([t.tid])
        assert os.getpriority(os.PRIO_PROCESS, t.tid) == 0
        os.sched_setscheduler(t.tid, os.SCHED_FIFO, os.sched_param(1))
        assert t.tid in changed_threads(os.getpid())
        lower([t.tid])
        assert os.sched_getscheduler(t.tid) == os.SCHED_OTHER
        assert t.tid not in changed_threads(os.getpid())
    finally:
        t.stop.set()


@pytest.mark.root
def test_static_rt_boosts_restores_and_resets_inherited_threads() -> None:
    from bench.vm_latency.qemu_threads import Sampler, static_rt
    from bench.vm_latency.timeline import segments as build

    me = os.getpid()
    t = _Sleeper()
    try:
        with Sampler(me) as sampler:
            with static_rt(me, [t.tid]):
                assert os.sched_getscheduler(t.tid) == os.SCHED_FIFO
                assert os.sched_getparam(t.tid).sched_priority == 1
                t.spawn.set()
                deadline = time.monotonic() + 10
                while not t.child_tid and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert os.sched_getscheduler(t.child_tid) == os.SCHED_FIFO  # inherited
                time.sleep(0.2)  # the sampler's period is 20 ms; this is no timing assert
            assert os.sched_getscheduler(t.tid) == os.SCHED_OTHER
            assert os.sched_getscheduler(t.child_tid) == os.SCHED_OTHER
            restored, deadline = time.monotonic(), time.monotonic() + 30
            while not any(s.tid == t.tid and s.t > restored for s in sampler.snapshot()):
                assert time.monotonic() < deadline, "no sample after the restore in 30 s"
                time.sleep(0.01)
        runs = build(sampler.snapshot(), end=float("inf"))
        name = next(n for n in runs if n.endswith(f" [{t.tid}]"))
        assert any(r.boosted and r.label == "fifo 1" for r in runs[name])
        assert not runs[name][-1].boosted
    finally:
        t.stop.set()


@pytest.mark.root
def test_static_rt_leaves_no_thread_rt_that_was_not_before() -> None:
    """Every thread RT at the end and not before goes back, not only the new ones (a
    thread pool worker stayed FIFO through every later mode of a run); one RT before
    stays as it was."""
    from bench.vm_latency.qemu_threads import static_rt

    me = os.getpid()
    boosted, bystander, own_rt = _Sleeper(), _Sleeper(), _Sleeper()
    try:
        os.sched_setscheduler(own_rt.tid, os.SCHED_FIFO, os.sched_param(5))
        with static_rt(me, [boosted.tid]):
            os.sched_setscheduler(bystander.tid, os.SCHED_FIFO, os.sched_param(1))
        for t in (boosted, bystander):
            assert os.sched_getscheduler(t.tid) == os.SCHED_OTHER
        assert os.sched_getscheduler(own_rt.tid) == os.SCHED_FIFO
        assert os.sched_getparam(own_rt.tid).sched_priority == 5
    finally:
        for t in (boosted, bystander, own_rt):
            os.sched_setscheduler(t.tid, os.SCHED_OTHER, os.sched_param(0))
            t.stop.set()


@pytest.mark.root
def test_pinned_moves_threads_and_puts_them_back() -> None:
    from bench.vm_latency.qemu_threads import pinned

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs to pin apart")
    t = _Sleeper()
    try:
        before = os.sched_getaffinity(t.tid)
        with pinned(os.getpid(), [t.tid], cpus[-1], set(cpus[:-1])):
            assert os.sched_getaffinity(t.tid) == {cpus[-1]}
        assert os.sched_getaffinity(t.tid) == before
    finally:
        t.stop.set()


def test_host_load_counters_never_go_back() -> None:
    """Real workers, sampled as fast as the benchmark can: the work counted only grows.
    (Workers that packed with struct.pack_into let a sample read a zeroed slot: a window
    showed negative work/s and the next one too much.)"""
    from bench.vm_latency.hostload import HostLoad

    with HostLoad([sorted(os.sched_getaffinity(0))[0]], 2) as load:
        first = prev = load.sample()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline or prev.work == first.work:
            sample = load.sample()
            assert sample.work >= prev.work, (prev, sample)
            prev = sample
            assert time.monotonic() < deadline + 60, "the workers did no work in a minute"


def test_a_guest_that_dies_at_boot_is_one_line(monkeypatch, capsys) -> None:
    """QEMU under KVM that dies at start (here: an MSR the host's KVM refuses) left QMP
    refusing the connection, and the benchmark ended in a traceback."""
    from bench.vm_latency import run
    from guestagent.errors import GuestagentError

    def dies(args, argv):
        raise GuestagentError("/tmp/x/qmp.sock: cannot talk QMP: Connection reset by peer")

    monkeypatch.setattr(run, "run", dies)
    assert run.main(["--seconds", "1"]) == 1
    err = capsys.readouterr().err
    assert err == ("vm_latency: error: the guest: /tmp/x/qmp.sock: cannot talk QMP: "
                   "Connection reset by peer\n")


def test_a_host_load_worker_that_dies_is_one_line_naming_it() -> None:
    """A worker gone mid-run (killed here) made the next sample a FileNotFoundError
    traceback; the throughput figures cannot be trusted then, so the run stops, saying so."""
    from bench.vm_latency.hostload import HostLoad, LoadError

    cpu = sorted(os.sched_getaffinity(0))[0]
    with HostLoad([cpu], 2) as load:
        victim = load.procs[1]
        victim.kill()
        victim.wait()
        with pytest.raises(LoadError, match=rf"worker {victim.pid} \(CPU {cpu}\) is gone, "
                                            r"exit status -9"):
            load.sample()


def test_a_plot_written_where_the_record_keeps_it_is_left_in_place(tmp_path) -> None:
    """`--png docs/performance.png` made the record's copy a SameFileError after a full
    run, and docs/performance.md was never written."""
    from bench.vm_latency.run import place_plot

    plot = tmp_path / "performance.png"
    plot.write_bytes(b"png")
    place_plot(str(plot), plot)
    assert plot.read_bytes() == b"png"
    elsewhere = tmp_path / "out.png"
    elsewhere.write_bytes(b"new")
    place_plot(str(elsewhere), plot)
    assert plot.read_bytes() == b"new"
