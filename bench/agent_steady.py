"""The agent at steady state: CPU time and RSS of `guestagent run` with 1,000 and
10,000 sleeping threads in the guest (this machine stands in for the guest).

The agent runs as a subprocess on a local region with its default sweep
settings. After it settles, its CPU time (utime + stime from /proc/<pid>/stat)
is taken over --repeat windows of --window seconds, and its VmRSS once a second.
Beside it: the agent's own sweep cost and interval (`guestagent status --json`),
and, for comparison, what the naive way (parsing every /proc/*/task/*/stat at
each sweep, at the same interval) would cost.
Beside the CPU: how many tasks other work created on this machine meanwhile (the
churn: each one is a fork and an exit event for the agent), and the agent's
wake-ups by source (its status).
Targets: at most 0.5 % of one CPU at 1,000 and at 10,000 threads, under the churn
of a machine where other work creates about a dozen tasks a second (--churn N
adds N short-lived processes a second of this bench's own to whatever else
runs, so that a quiet machine is measured under that churn too); RSS at most 40 MB.
Run as root: python3 bench/agent_steady.py [--threads 1000,10000] [--window 30] [--repeat 3]
[--churn 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agent_proc import cpu_seconds, forks_so_far, rss_mib, running_agent, verdict, wakeups  # noqa: E402
from observe_load import count_threads, live_threads, raised_limits  # noqa: E402
from observe_sweep import naive  # noqa: E402

TARGET_CPU_PERCENT = 0.5  # at 1,000 and 10,000 threads
TARGET_RSS_MB = 40.0


def naive_share(interval_s: float, repeat: int = 3) -> tuple[float, float]:
    """(median seconds of one naive /proc parse, its share of one CPU at interval_s)."""
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        naive()
        times.append(time.process_time() - t0)
    cost = statistics.median(times)
    return cost, cost / max(interval_s, cost) * 100


@contextmanager
def churning(per_second: float) -> Iterator[None]:
    """Start per_second short-lived processes (/bin/true) a second until the end."""
    stop = threading.Event()

    def spawn() -> None:
        period = 1.0 / per_second
        due = time.monotonic()
        while not stop.wait(max(0.0, due - time.monotonic())):
            subprocess.run(["true"], check=False)
            due += period

    worker = threading.Thread(target=spawn, daemon=True)
    if per_second > 0:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        if per_second > 0:
            worker.join()


def measure(window: float, repeat: int, settle: float, churn: float) -> dict:
    with running_agent() as agent, churning(churn):
        time.sleep(settle)
        cpu, rss, wake, forks = [], [], [], []
        by_source: dict[str, list[float]] = {}
        for _ in range(repeat):
            w0, f0 = wakeups(agent.pid), forks_so_far()
            s0 = agent.ask("status").get("wakeups", {})
            c0, t0 = cpu_seconds(agent.pid), time.monotonic()
            while time.monotonic() - t0 < window:
                rss.append(rss_mib(agent.pid))
                time.sleep(min(1.0, window / 4))
            c1, t1 = cpu_seconds(agent.pid), time.monotonic()
            s1 = agent.ask("status").get("wakeups", {})
            cpu.append((c1 - c0) / (t1 - t0) * 100)
            wake.append((wakeups(agent.pid) - w0) / (t1 - t0))
            forks.append((forks_so_far() - f0) / (t1 - t0))
            for source in s1:
                by_source.setdefault(source, []).append(
                    (s1[source] - s0.get(source, 0)) / (t1 - t0))
        status = agent.status_cli()
        problems = agent.log_lines()
    return {"cpu": cpu, "rss": rss, "wake": wake, "forks": forks, "status": status,
            "problems": problems, "by_source": by_source}


def report(total: int, live: int, res: dict, added: float) -> None:
    st = res["status"]
    cpu, rss = res["cpu"], res["rss"]
    cpu_med, rss_med, rss_max = statistics.median(cpu), statistics.median(rss), max(rss)
    interval = st["sweep_interval_ms"] / 1000
    naive_cost, naive_pct = naive_share(interval)
    print(f"\n== {total} extra threads ({live} live threads in all) ==")
    print(f"agent: {st['threads']} threads known via {st['thread_events']}, "
          f"{st['sweeps']} sweeps, last sweep {st['sweep_ms']:.2f} ms, "
          f"sweep interval {st['sweep_interval_ms']:.0f} ms "
          f"(from guestagent status --json)")
    churn = statistics.median(res["forks"])
    print(f"cpu: median {cpu_med:.3f} % of one CPU over {len(cpu)} windows "
          f"(min {min(cpu):.3f}, max {max(cpu):.3f}) (target <= {TARGET_CPU_PERCENT} %) "
          f"{verdict(cpu_med, TARGET_CPU_PERCENT)}")
    print(f"churn: {churn:.1f} tasks/s created on this machine by other work, median "
          f"(per window: {', '.join(f'{f:.1f}' for f in res['forks'])}; "
          f"{added:g}/s of them started by this bench, --churn)")
    print(f"rss: median {rss_med:.1f} MiB, max {rss_max:.1f} MiB "
          f"(target <= {TARGET_RSS_MB:.0f} MB) {verdict(rss_max * 1.048576, TARGET_RSS_MB)}")
    sweep_share = st["sweep_ms"] / st["sweep_interval_ms"] * 100
    print(f"of which sweeps: about {sweep_share:.3f} % (last sweep / interval); the rest is "
          f"{statistics.median(res['wake']):.0f} wakeups/s of the agent")
    sources = sorted(((statistics.median(v), k) for k, v in res["by_source"].items()),
                     reverse=True)
    print("wake-ups by source (the agent's loop, per second, median): "
          + (", ".join(f"{k} {rate:.1f}" for rate, k in sources) or "none reported")
          + f"; the wake-ups of its process, all causes: {statistics.median(res['wake']):.0f}/s")
    print(f"naive: one /proc/*/task/*/stat parse costs {naive_cost * 1e3:.1f} ms of CPU = "
          f"{naive_pct:.2f} % of one CPU at the agent's interval; the agent's sweep is "
          f"{naive_cost * 1e3 / max(st['sweep_ms'], 1e-3):.1f}x cheaper")
    print(f"log: {len(res['problems'])} warning/error lines"
          + "".join(f"\n  {line}" for line in res["problems"][:10]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1000,10000")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per CPU window")
    ap.add_argument("--repeat", type=int, default=3, help="CPU windows per size")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds before measuring")
    ap.add_argument("--churn", type=float, default=0.0,
                    help="short-lived processes a second that this bench adds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (raises pid_max/threads-max for the 10,000-thread case)")
        return 2
    sizes = [int(x) for x in args.threads.split(",")]
    with raised_limits(max(sizes)):
        for total in sizes:
            with live_threads(total):
                live = count_threads()
                res = measure(args.window, args.repeat, args.settle, args.churn)
                report(total, live, res, args.churn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
