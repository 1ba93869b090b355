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

Exits: a second agent runs with hold_time_ms --exit-hold-ms. Each trial starts a
new probe thread, makes it FIFO, waits for its boost in the region, and ends the
thread; the time from its end to a neutral hint for that vCPU in the region is
timed. The thread's exit (the proc connector) and the end of the hold are
deadlines of the agent's loop, whatever its sweep interval: target p99 at most
hold_time_ms + 100 ms. ("Neutral" here: the probe's boost is gone from that
vCPU's hint; other work of this machine may hold a hint of its own there.)
Run as root: python3 bench/agent_latency.py [--threads 1000,10000] [--trials 200]
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


EXIT_SLACK_MS = 100.0  # exit -> neutral within hold_time_ms + this, p99


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


def run_exit_trials(agent, cpu: int, prio: int, trials: int, poll: float,
                    pause: float) -> tuple[list[float], int]:
    """Exit of a boosted thread -> its boost gone from the region, once per trial."""
    ends, lost = [], 0
    host = RegionHostLink(agent.region, poll_interval=poll)

    def dropped() -> bool:
        return ours(host, cpu, prio) is False

    try:
        if wait_until(host, dropped, poll, 30) is None:
            raise RuntimeError(f"vCPU {cpu} already shows FIFO {prio}: choose --prio")
        for _ in range(trials):
            time.sleep(random.uniform(0, pause))
            probe = Probe(cpu)
            probe.set_fifo(prio)
            if wait_until(host, lambda: ours(host, cpu, prio), poll, 10) is None:
                lost += 1
                probe.close()
                wait_until(host, dropped, poll, 30)
                continue
            probe.close()  # joined: the thread has exited
            t0 = time.monotonic()
            seen = wait_until(host, dropped, poll, 30)
            if seen is None:
                raise RuntimeError("the hint did not drop within 30 s of the thread's exit")
            ends.append(seen - t0)
    finally:
        host.close()
    return ends, lost


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
    ap.add_argument("--threads", default="1000,10000")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--cpu", type=int, default=os.cpu_count() - 1, help="the probe's CPU")
    ap.add_argument("--prio", type=int, default=88, help="the probe's FIFO priority: one "
                    "that no other thread on that CPU has")
    ap.add_argument("--poll-ms", type=float, default=1.0, help="host-side region polling")
    ap.add_argument("--pause-ms", type=float, default=None,
                    help="longest random pause before each trial (default: the agent's "
                    "sweep interval)")
    ap.add_argument("--exit-hold-ms", type=int, default=500,
                    help="hold_time_ms of the agent for the exit trials")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (SCHED_FIFO, proc connector, raising pid_max)")
        return 2
    sizes = [int(x) for x in args.threads.split(",")]
    poll = args.poll_ms / 1000
    pause = None if args.pause_ms is None else args.pause_ms / 1000
    with raised_limits(max(sizes)):
        for total in sizes:
            with live_threads(total):
                live = count_threads()
                with running_agent(hold_time_ms=0, min_change_interval_ms=0) as agent:
                    boost, unboost, lost = run_trials(agent, args.cpu, args.prio, args.trials,
                                                      poll, pause)
                    status = agent.status_cli()
                    problems = agent.log_lines()
                with running_agent(hold_time_ms=args.exit_hold_ms,
                                   min_change_interval_ms=0) as agent:
                    exit_pause = pause if pause is not None else \
                        agent.ask("status")["sweep_interval_ms"] / 1000
                    ends, exit_lost = run_exit_trials(agent, args.cpu, args.prio, args.trials,
                                                      poll, exit_pause)
                    exit_status = agent.status_cli()
                    problems += agent.log_lines()
            report(args, total, live, status, exit_status, boost, unboost, lost, ends,
                   exit_lost, problems)
    return 0


def report(args, total: int, live: int, status: dict, exit_status: dict, boost, unboost,
           lost: int, ends, exit_lost: int, problems: list[str]) -> None:
    print(f"\n== {total} extra threads ({live} live), probe on vCPU {args.cpu} at "
          f"FIFO {args.prio}, region polled every {args.poll_ms:g} ms ==")
    print(f"agent: sweep {status['sweep_ms']:.2f} ms, sweep interval "
          f"{status['sweep_interval_ms']:.0f} ms, thread tracking {status['thread_events']}, "
          f"generation {status['generation']} (from guestagent status --json)")
    print(line("boost", [x * 1e3 for x in boost], TARGET_MS))
    print(line("unboost (hold 0)", [x * 1e3 for x in unboost], TARGET_MS))
    print(f"lost: {lost} boosts not seen within 10 s")
    print(line(f"exit -> neutral (hold {args.exit_hold_ms} ms)", [x * 1e3 for x in ends],
               args.exit_hold_ms + EXIT_SLACK_MS))
    print(f"exit agent: sweep interval {exit_status['sweep_interval_ms']:.0f} ms, "
          f"{exit_status['sweeps']} sweeps, {exit_status['refreshes']} refreshes; "
          f"{exit_lost} boosts not seen within 10 s")
    print(f"log: {len(problems)} warning/error lines"
          + "".join(f"\n  {p}" for p in problems[:10]))


if __name__ == "__main__":
    sys.exit(main())
