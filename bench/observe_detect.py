"""Detection latency: a new thread sets SCHED_FIFO right after it starts; how long
until the observer's thread table shows it as FIFO? And what the watching costs.

The observer runs as the agent's core drives it (guestagent/agent/core.py): an
event loop polls its fds (proc connector, scheduler-change wake-ups), sweeps with
snapshot(full=False) spaced so that sweeping costs at most --budget % of one CPU
(never more often than --floor-ms), takes a full snapshot at most once a second,
calls check_changes() at the observer's deadline(), sweeping at once when it
says so, and otherwise refresh(), which re-reads only the threads named by
wake-ups and the young threads found real-time.
A helper process starts one thread per trial, after a random pause (so trials
fall at every phase of the sweep timer) that starts when the loop says it saw
the last one; the helper keeps its own time and reports its threads only at
the end, so that the observing loop wakes only for what an agent would. The
thread takes CLOCK_MONOTONIC (shared by all processes) and then calls
sched_setscheduler(FIFO); with --born-rt the helper runs FIFO itself and takes
the clock just before it starts a thread, which is born FIFO and calls nothing
(what only the real-time birth wake-up, or the process connector, can show).
The latency
is from that clock reading to the end of the first snapshot that lists the
thread as FIFO. The CPU figures are the CPU time of the whole observing loop
(events, young checks, sweeps) over wall time: "steady" for --quiet-s seconds
before the trials (the loop alone, as an agent spends most of its life), and
during the trials. What each new RT thread costs is the trials' CPU time beyond
the steady share, divided by the trials, counted two ways: "all" takes every
CPU second as it comes; "beside the periodic sweeps" leaves out the sweeps
that the budget schedules anyway (in both periods: their cadence follows their
smoothed cost, so the two periods may hold different numbers of them), and
keeps the sweeps that a trial triggered (the young sweeps). The naive way,
beside it from the same run: a sweep (snapshot(full=False)) for every new RT
thread, timed --naive times after the trials. The loop's wake-ups per new RT
thread beyond the steady rate are printed too: each costs CPU (select, the
switch back, a cold interpreter) before the observer does any work; and what a
turn costs on average, its sweep aside, at steady state and during the trials.
Targets: p99 <= 50 ms with 1,000 threads, <= 10 ms with 10,000; agent CPU at
most 0.5 % of one CPU at steady state, at most 0.5 ms of CPU per new RT thread.
Run as root: python3 bench/observe_detect.py [--threads 1000,10000] [--trials 200] [--born-rt]
"""

from __future__ import annotations

import argparse
import os
import random
import select
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from observe_load import count_threads, live_threads, percentile, raised_limits  # noqa: E402

from guestagent.observe import Observer  # noqa: E402
from guestagent.protocol.model import SchedClass  # noqa: E402

TARGETS_MS = {1000: 50.0, 10000: 10.0}
TARGET_CPU = 0.005
TARGET_PER_THREAD_MS = 0.5
FULL_INTERVAL = 1.0  # as the daemon
MISS_AFTER = 30.0  # s: a trial not seen by then is counted missed


def trial_process(trials: int, max_pause: float, seen_r: int, out_w: int,
                  inherit: bool) -> None:
    """Child: runs the trials on its own clock, so that the observing loop wakes only
    for what an agent would. Each trial, after a random pause (so trials fall at
    every phase of the sweep timer), ends the previous thread and starts one that
    takes CLOCK_MONOTONIC and goes FIFO at once (``inherit``: this process runs
    FIFO, takes the clock and starts a thread that is born FIFO); the next pause
    starts once the loop has said, on ``seen_r``, that it saw the thread. Writes
    'tid t0' per trial to ``out_w`` when all are done (nothing for the loop to
    read meanwhile), then closes it."""
    reports: list[tuple[int, float]] = []  # (tid, t0) of each trial's thread
    stop = threading.Event()
    started = threading.Semaphore(0)

    def body(gate: threading.Event, born: float | None) -> None:
        t0 = time.monotonic() if born is None else born
        if born is None:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        reports.append((threading.get_native_id(), t0))
        started.release()
        gate.wait(30)

    if inherit:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    for _ in range(trials):
        time.sleep(random.uniform(0, max_pause))
        stop.set()
        stop = threading.Event()
        born = time.monotonic() if inherit else None
        threading.Thread(target=body, args=(stop, born), daemon=True).start()
        started.acquire()
        want, buf = str(reports[-1][0]).encode(), b""
        give_up = time.monotonic() + MISS_AFTER
        while want not in buf.split(b"\n"):  # until the loop saw it, or it is missed
            left = give_up - time.monotonic()
            if left <= 0 or not select.select([seen_r], [], [], left)[0]:
                break
            chunk = os.read(seen_r, 4096)
            if not chunk:  # the loop is gone: no more trials
                stop.set()
                os._exit(1)
            buf += chunk
    stop.set()
    os.write(out_w, "".join(f"{tid} {t0!r}\n" for tid, t0 in reports).encode())
    os._exit(0)


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    missed: int = 0  # trials whose thread no snapshot showed as FIFO within MISS_AFTER
    costs: list[float] = field(default_factory=list)  # CPU time of each snapshot
    sweeps: int = 0
    young_sweeps: int = 0
    full_sweeps: int = 0
    young_cpu: float = 0.0  # CPU time of the snapshots young threads triggered
    refreshes: int = 0  # snapshots that re-read only the threads that changed
    quiet_cpu: float = 0.0  # CPU share of the loop with no trials running
    quiet_sweep_cpu: float = 0.0  # CPU share of its periodic sweeps
    quiet_sweeps: int = 0
    quiet_wakeups: float = 0.0  # turns of the loop per second with no trials running
    wakeups: int = 0  # turns of the loop (each a return from select)
    cpu: float = 0.0  # CPU time of the observing loop during the trials
    naive: list[float] = field(default_factory=list)  # CPU time of sweeps, the naive way
    wall: float = 0.0
    interval: float = 0.0
    mode: str = ""


class AgentLoop:
    """The core's observing stage (guestagent/agent/core.py AgentCore.observe), alone."""

    def __init__(self, obs: Observer, budget: float, floor: float, run: Run,
                 extra_fd: int, seen_w: int) -> None:
        self.obs, self.budget, self.floor, self.run = obs, budget, floor, run
        now = time.monotonic()
        obs.snapshot(now)
        self.extra_fd, self.seen_w = extra_fd, seen_w
        self.interval = floor
        self.next_sweep, self.next_full = now + floor, now + FULL_INTERVAL
        self.first_seen: dict[int, float] = {}  # FIFO tid -> end of the first snapshot showing it

    def step(self, until: float | None) -> bool:
        """One turn: wait for an fd or a deadline (or ``until``); True if extra_fd is readable."""
        obs, run = self.obs, self.run
        run.wakeups += 1
        now = time.monotonic()
        due = [d for d in (self.next_sweep, obs.deadline(), until) if d is not None]
        extra = False
        fds = obs.fds() + [self.extra_fd]  # they change: batching, exit watches, hotplug
        for fd in select.select(fds, [], [], max(0.0, min(due) - now))[0]:
            if fd == self.extra_fd:
                extra = True
            else:
                obs.handle_readable(fd)
        now = time.monotonic()
        young_due = obs.deadline()
        young = young_due is not None and now >= young_due and obs.check_changes(now)
        if young or now >= self.next_sweep:
            full = now >= self.next_full
            c0 = time.thread_time()
            snap = obs.snapshot(now, full=full)
            cost = time.thread_time() - c0
            end = time.monotonic()
            run.costs.append(cost)
            run.sweeps += 1
            run.young_sweeps += young
            run.young_cpu += cost if young else 0.0
            run.full_sweeps += full
            self.interval = max(self.floor, obs.cost / self.budget)  # as the daemon paces
            self.next_sweep = now + self.interval
            if full:
                self.next_full = now + FULL_INTERVAL
            self.seen(snap, end)
        else:
            snap = obs.refresh(now)
            if snap is not None:
                run.refreshes += 1
                self.seen(snap, time.monotonic())
        return extra

    def seen(self, snap, end: float) -> None:
        for t in snap.threads:
            if t.policy == SchedClass.FIFO and t.tid not in self.first_seen:
                self.first_seen[t.tid] = end
                os.write(self.seen_w, b"%d\n" % t.tid)  # the next trial may start


def measure(trials: int, budget: float, floor: float, max_pause: float, quiet: float,
            naive: int, inherit: bool = False) -> Run:
    seen_r, seen_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = None
    try:
        run = Run()
        with Observer() as obs:
            run.mode = obs.thread_mode
            loop = AgentLoop(obs, budget, floor, run, out_r, seen_w)
            # steady state first: the loop alone, as an agent spends most of its life
            wall0, cpu0 = time.monotonic(), time.thread_time()
            while time.monotonic() < wall0 + quiet:
                loop.step(wall0 + quiet)
            quiet_wall = max(1e-9, time.monotonic() - wall0)
            run.quiet_cpu = (time.thread_time() - cpu0) / quiet_wall
            run.quiet_sweep_cpu = (sum(run.costs) - run.young_cpu) / quiet_wall
            run.quiet_sweeps, run.sweeps, run.young_sweeps, run.full_sweeps = run.sweeps, 0, 0, 0
            run.quiet_wakeups, run.wakeups = run.wakeups / quiet_wall, 0
            run.young_cpu, run.costs = 0.0, []
            wall0, cpu0 = time.monotonic(), time.thread_time()
            pid = os.fork()
            if pid == 0:
                os.close(seen_w)  # so that the loop's end is an EOF here
                os.close(out_r)
                trial_process(trials, max_pause, seen_r, out_w, inherit)
            os.close(out_w)
            out_w = -1
            while not loop.step(None):  # until the trials' report arrives, once
                pass
            run.wall = time.monotonic() - wall0
            run.cpu = time.thread_time() - cpu0
            run.interval = loop.interval
            report = b""
            chunk = os.read(out_r, 65536)
            while chunk:
                report += chunk
                chunk = os.read(out_r, 65536)
            for line in report.splitlines():
                tid, t0 = line.split()
                if int(tid) in loop.first_seen:
                    run.latencies.append(loop.first_seen[int(tid)] - float(t0))
                else:
                    run.missed += 1
            for _ in range(naive):  # the naive way: one sweep per new RT thread
                c0 = time.thread_time()
                obs.snapshot(time.monotonic(), full=False)
                run.naive.append(time.thread_time() - c0)
    finally:
        for fd in (seen_w, seen_r, out_r, out_w):
            if fd >= 0:
                os.close(fd)  # closing seen_w ends the trials if they are still running
        if pid is not None:
            os.waitpid(pid, 0)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1000,10000")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--budget", type=float, default=0.5,
                    help="CPU budget of the sweeps, %% of one CPU (default 0.5)")
    ap.add_argument("--floor-ms", type=float, default=100.0,
                    help="shortest sweep interval (the daemon's sweep_interval_ms)")
    ap.add_argument("--quiet-s", type=float, default=20.0,
                    help="seconds of the loop alone, for the steady CPU figure")
    ap.add_argument("--max-pause-ms", type=float, default=300.0,
                    help="trials start after a random pause up to this long")
    ap.add_argument("--born-rt", action="store_true",
                    help="threads born FIFO from a FIFO parent, instead of setting FIFO")
    ap.add_argument("--naive", type=int, default=20,
                    help="sweeps timed after the trials, for the naive way's figure")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (SCHED_FIFO, proc connector, raising pid_max)")
        return 2
    sizes = [int(x) for x in args.threads.split(",")]
    with raised_limits(max(sizes)):
        for total in sizes:
            load = os.getloadavg()[0]  # before our own threads start (they count in it)
            with live_threads(total):
                live = count_threads()
                run = measure(args.trials, args.budget / 100, args.floor_ms / 1000,
                              args.max_pause_ms / 1000, args.quiet_s, max(1, args.naive),
                              args.born_rt)
            ms = [x * 1e3 for x in run.latencies]
            if not ms:
                print(f"\n== {total} extra threads: no trial's thread was seen as FIFO ==")
                continue
            target = TARGETS_MS.get(total)
            p99 = percentile(ms, 99)
            verdict = "" if target is None else \
                f" (target <= {target:.0f} ms) " \
                f"{'OK' if p99 <= target and not run.missed else 'MISSED'}"
            if run.missed:
                verdict += f", and {run.missed} trials never seen as FIFO"
            share, steady = run.cpu / run.wall, run.quiet_cpu
            per_rt_all = max(0.0, run.cpu - steady * run.wall) / max(1, len(ms)) * 1e3
            periodic = sum(run.costs) - run.young_cpu  # sweeps the budget schedules anyway
            per_rt = max(0.0, (run.cpu - periodic)
                         - (steady - run.quiet_sweep_cpu) * run.wall) / max(1, len(ms)) * 1e3
            how = "born FIFO from a FIFO parent" if args.born_rt else "set FIFO after start"
            print(f"\n== {total} extra threads ({live} live), budget {args.budget:g} % of a CPU, "
                  f"thread tracking: {run.mode}, trial threads {how}, "
                  f"load average {load:.2f} before ==")
            print(f"detection over {len(ms)} trials: p50 {percentile(ms, 50):.1f} ms, "
                  f"p99 {p99:.1f} ms, max {max(ms):.1f} ms{verdict}")
            print(f"observer CPU: steady {steady:.2%} of one CPU "
                  f"(target <= {TARGET_CPU:.1%}) {'OK' if steady <= TARGET_CPU else 'MISSED'} "
                  f"({run.quiet_sweeps} sweeps in {args.quiet_s:g} s); "
                  f"{share:.2%} during the trials, with {run.young_sweeps} extra sweeps and "
                  f"{run.refreshes} refreshes, over {run.wall:.1f} s")
            print(f"CPU per new RT thread: {per_rt:.2f} ms beyond the steady share, beside "
                  f"the periodic sweeps ({per_rt_all:.2f} ms with them) "
                  f"(target <= {TARGET_PER_THREAD_MS} ms) "
                  f"{'OK' if per_rt <= TARGET_PER_THREAD_MS else 'MISSED'}")
            extra = (run.wakeups - run.quiet_wakeups * run.wall) / max(1, len(ms))
            # a turn's CPU beside the sweeps: what waking up and looking around costs
            idle_turn = (steady - run.quiet_sweep_cpu) / max(run.quiet_wakeups, 1e-9) * 1e6
            trial_turn = (run.cpu - sum(run.costs)) / max(1, run.wakeups) * 1e6
            print(f"loop wake-ups: {extra:.1f} per new RT thread beyond the steady "
                  f"{run.quiet_wakeups:.1f}/s; CPU per turn, sweeps aside: "
                  f"{idle_turn:.0f} us steady, {trial_turn:.0f} us during the trials")
            naive_ms = statistics.median(run.naive) * 1e3
            print(f"naive way, a sweep per new RT thread: {naive_ms:.2f} ms median of "
                  f"{len(run.naive)}; this path {naive_ms / max(per_rt, 1e-3):.1f}x cheaper")
            median = f"{statistics.median(run.costs) * 1e3:.2f} ms" if run.costs else "-"
            print(f"{run.sweeps} sweeps ({run.full_sweeps} full), sweep interval "
                  f"{run.interval * 1e3:.0f} ms, sweep CPU median {median}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
