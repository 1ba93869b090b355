"""Policy-sweep cost per thread with 1,000 and 10,000 live threads.

Compares, in the same run and on the same threads:
  sweep     ThreadTable.sweep(full=False), the daemon's frequent path: one
            sched_getscheduler per thread, getpriority for a rotating quarter,
            cheap verification of the threads that matter (stat via kept fds
            only for user-space RT/interest threads)
  full      ThreadTable.sweep(full=True), the once-a-second path: every detail re-read
  floor     sched_getscheduler for every thread and nothing else
  naive     read and parse every /proc/*/task/*/stat for its policy field
  psutil    psutil.process_iter() + Process.threads() + Process(tid).nice()
            (psutil exposes no scheduling policy; nice is the closest it reads)
The methods run interleaved, in a new random order each round, so that a noisy
neighbour (and the cold caches psutil leaves behind) weighs on all of them alike.
Target: at most 0.5 us per thread, at least 20x faster than the naive parser.
Run as root: python3 bench/observe_sweep.py [--threads 1000,10000] [--repeat 9]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from observe_load import count_threads, live_threads, percentile, raised_limits  # noqa: E402

from guestagent.observe.kernel import LiveKernel  # noqa: E402
from guestagent.observe.threads import ThreadTable  # noqa: E402

TARGET_US = 0.5
TARGET_RATIO = 20.0


def naive() -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            int(raw[raw.rfind(b")") + 2:].split()[38])
            n += 1
    return n


def with_psutil() -> int:
    import psutil

    n = 0
    for proc in psutil.process_iter():
        try:
            threads = proc.threads()
        except psutil.Error:
            continue
        for t in threads:
            try:
                psutil.Process(t.id).nice()
            except psutil.Error:
                continue
            n += 1
    return n


def run(total: int, repeat: int) -> None:
    with live_threads(total):
        live = count_threads()
        table = ThreadTable(LiveKernel(), watch=True)  # proc connector, as the daemon runs
        if table.mode != "events":
            print("note: process events unavailable: sweeps include a /proc rescan")
        table.sweep()  # first sweep scans /proc: the steady state is what is measured

        def sweep() -> int:
            table.handle_readable()
            table.sweep(full=False)
            return len(table)

        def full() -> int:
            table.handle_readable()
            table.sweep(full=True)
            return len(table)

        def floor() -> int:  # the bare syscall pass inside sweep(), for reference
            tids = list(table._known)
            table._kernel.policies(tids)
            return len(tids)

        methods = {"sweep": sweep, "full": full, "floor": floor, "naive": naive,
                   "psutil": with_psutil}
        per: dict[str, list[float]] = {name: [] for name in methods}
        whole: dict[str, list[float]] = {name: [] for name in methods}
        counts: dict[str, int] = {}
        order = list(methods)
        for _ in range(repeat):
            random.shuffle(order)  # the first after psutil finds cold caches: spread that
            for name in order:
                fn = methods[name]
                t0 = time.perf_counter()
                n = fn()
                dt = time.perf_counter() - t0
                counts[name] = n
                whole[name].append(dt)
                per[name].append(dt / max(n, 1) * 1e6)
        matter = len(table.sweep(full=False)[0])
        table.close()
    print(f"\n== {total} extra threads ({live} live threads in all, {matter} that matter) ==")
    print(f"{'method':<10}{'threads':>9}{'median us/thread':>18}{'p99 us/thread':>15}"
          f"{'median sweep ms':>17}")
    for name in methods:
        print(f"{name:<10}{counts[name]:>9}{statistics.median(per[name]):>18.3f}"
              f"{percentile(per[name], 99):>15.3f}{statistics.median(whole[name]) * 1e3:>17.2f}")
    sweep_us = statistics.median(per["sweep"])
    ratio_naive = statistics.median(per["naive"]) / sweep_us
    ratio_psutil = statistics.median(per["psutil"]) / sweep_us
    over_floor = sweep_us / statistics.median(per["floor"])
    ok_us = "OK" if sweep_us <= TARGET_US else "MISSED"
    ok_ratio = "OK" if ratio_naive >= TARGET_RATIO else "MISSED"
    print(f"sweep: {sweep_us:.3f} us/thread (target <= {TARGET_US}) {ok_us}; "
          f"{ratio_naive:.1f}x faster than naive (target >= {TARGET_RATIO:.0f}x) {ok_ratio}; "
          f"{ratio_psutil:.1f}x faster than psutil; {over_floor:.2f}x the syscall floor")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (raises pid_max/threads-max for the 10,000-thread case)")
        return 2
    sizes = [int(x) for x in args.threads.split(",")]
    with raised_limits(max(sizes)):
        for total in sizes:
            run(total, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
