"""From a thread's policy change to the hint visible in the region, through the agent.

`guestagent run` runs as a subprocess on a local region (hold_time_ms 0 and
min_change_interval_ms 0, so an unboost is not held back on purpose; the sweep
settings stay at their defaults), with --threads sleeping threads beside it.
A probe thread of this process, pinned to one CPU and sleeping, is switched to
SCHED_FIFO at a priority no other thread of that CPU has; this process reads the
region as the host does (RegionHostLink on the same file, ticked every --poll-ms)
and times until the hint for that vCPU shows BOOST at the probe's priority. Then
the probe goes back to SCHED_OTHER and the wait for the hint to drop is timed.
Each trial starts after a random pause up to the agent's current sweep interval
(from its status), so trials fall at every phase of the agent's sweep timer.
Target: p99 at most 100 ms with 1,000 threads (boost; the unboost is reported too).
Run as root: python3 bench/agent_latency.py [--threads 1000] [--trials 200]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agent_proc import running_agent, verdict  # noqa: E402
from observe_load import count_threads, live_threads, percentile, raised_limits  # noqa: E402

from guestagent.protocol.model import Request  # noqa: E402
from guestagent.transport.region_link import RegionHostLink  # noqa: E402

TARGET_MS = 100.0


class Probe:
    """A thread of this process, pinned to one CPU, asleep until closed."""

    def __init__(self, cpu: int) -> None:
        self._stop, ready = threading.Event(), threading.Event()
        self.tid = 0

        def body() -> None:
            self.tid = threading.get_native_id()
            with open(f"/proc/self/task/{self.tid}/comm", "w") as f:
                f.write("ga-bench-probe")
            os.sched_setaffinity(0, {cpu})
            ready.set()
            self._stop.wait()

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()
        ready.wait(5)

    def set_fifo(self, prio: int) -> None:
        os.sched_setscheduler(self.tid, os.SCHED_FIFO, os.sched_param(prio))

    def set_other(self) -> None:
        os.sched_setscheduler(self.tid, os.SCHED_OTHER, os.sched_param(0))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def ours(host: RegionHostLink, cpu: int, prio: int) -> bool | None:
    """Whether the vCPU's published hint is the probe's boost; None before any hints."""
    hints = host.view().hints
    if cpu >= len(hints):
        return None
    hint = hints[cpu]
    return hint.request == Request.BOOST and hint.rt_priority == prio


def wait_until(host: RegionHostLink, want, poll: float, timeout: float) -> float | None:
    """Tick the host link until want() holds; the monotonic time it was seen, or None."""
    end = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        host.tick(now)
        if want():
            return now
        if now > end:
            return None
        time.sleep(poll)


def run_trials(agent, cpu: int, prio: int, trials: int, poll: float,
               pause: float | None) -> tuple[list[float], list[float], int]:
    boost, unboost, lost = [], [], 0
    host = RegionHostLink(agent.region, poll_interval=poll)
    probe = Probe(cpu)
    try:
        if wait_until(host, lambda: ours(host, cpu, prio) is not None, poll, 30) is None:
            raise RuntimeError("the agent published no hints to the region within 30 s")
        for k in range(trials):
            if pause is None and k % 10 == 0:  # the interval follows the sweep cost
                interval = agent.ask("status")["sweep_interval_ms"] / 1000
            time.sleep(random.uniform(0, interval if pause is None else pause))
            if ours(host, cpu, prio):  # someone else at our priority on this vCPU
                raise RuntimeError(f"vCPU {cpu} already shows FIFO {prio}: choose --prio")
            t0 = time.monotonic()
            probe.set_fifo(prio)
            seen = wait_until(host, lambda: ours(host, cpu, prio), poll, 10)
            if seen is None:
                lost += 1
            else:
                boost.append(seen - t0)
            t0 = time.monotonic()
            probe.set_other()
            seen = wait_until(host, lambda: not ours(host, cpu, prio), poll, 10)
            if seen is None:
                raise RuntimeError("the hint did not drop within 10 s of the unboost")
            unboost.append(seen - t0)
    finally:
        probe.close()
        host.close()
    return boost, unboost, lost


def line(name: str, ms: list[float], target: float | None) -> str:
    if not ms:
        return f"{name}: no trials"
    p99 = percentile(ms, 99)
    verdict_text = "" if target is None else f" (target p99 <= {target:.0f} ms) " \
        f"{verdict(p99, target)}"
    return (f"{name} over {len(ms)} trials: p50 {percentile(ms, 50):.1f} ms, p99 {p99:.1f} ms, "
            f"max {max(ms):.1f} ms, mean {statistics.mean(ms):.1f} ms{verdict_text}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--cpu", type=int, default=os.cpu_count() - 1, help="the probe's CPU")
    ap.add_argument("--prio", type=int, default=88, help="the probe's FIFO priority: one "
                    "that no other thread on that CPU has")
    ap.add_argument("--poll-ms", type=float, default=1.0, help="host-side region polling")
    ap.add_argument("--pause-ms", type=float, default=None,
                    help="longest random pause before each trial (default: the agent's "
                    "sweep interval)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (SCHED_FIFO, proc connector, raising pid_max)")
        return 2
    with raised_limits(args.threads), live_threads(args.threads):
        live = count_threads()
        with running_agent(hold_time_ms=0, min_change_interval_ms=0) as agent:
            pause = None if args.pause_ms is None else args.pause_ms / 1000
            boost, unboost, lost = run_trials(agent, args.cpu, args.prio, args.trials,
                                              args.poll_ms / 1000, pause)
            status = agent.status_cli()
            problems = agent.log_lines()
    print(f"\n== {args.threads} extra threads ({live} live), probe on vCPU {args.cpu} at "
          f"FIFO {args.prio}, region polled every {args.poll_ms:g} ms ==")
    print(f"agent: sweep {status['sweep_ms']:.2f} ms, sweep interval "
          f"{status['sweep_interval_ms']:.0f} ms, thread tracking {status['thread_events']}, "
          f"generation {status['generation']} (from guestagent status --json)")
    print(line("boost", [x * 1e3 for x in boost], TARGET_MS))
    print(line("unboost (hold 0)", [x * 1e3 for x in unboost], TARGET_MS))
    print(f"lost: {lost} boosts not seen within 10 s")
    print(f"log: {len(problems)} warning/error lines"
          + "".join(f"\n  {p}" for p in problems[:10]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
