"""Detection latency: a new thread sets SCHED_FIFO right after it starts; how long
until the observer's thread table shows it as FIFO?

The observer runs as the daemon drives it: an event loop polls its fds
(proc connector) and sweeps every PERIOD. A helper process starts one thread
per trial, which takes CLOCK_MONOTONIC (shared by all processes) and then
calls sched_setscheduler(FIFO); the latency is from that clock reading to the
end of the first snapshot that lists the thread as FIFO.
Targets: p99 <= 50 ms with 1,000 threads, <= 200 ms with 10,000.
Run as root: python3 bench/observe_detect.py [--threads 1000,10000] [--trials 200]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from observe_load import count_threads, live_threads, percentile, raised_limits  # noqa: E402

from guestagent.observe import Observer  # noqa: E402
from guestagent.protocol.model import SchedClass  # noqa: E402

TARGETS_MS = {1000: 50.0, 10000: 200.0}


def trigger_process(cmd_r: int, out_w: int) -> None:
    """Child: on each byte from the parent, end the previous thread and start one
    that goes FIFO at once and reports 'tid t0'."""
    stop = threading.Event()

    def body(gate: threading.Event) -> None:
        t0 = time.monotonic()
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        os.write(out_w, f"{threading.get_native_id()} {t0!r}\n".encode())
        gate.wait(30)

    while os.read(cmd_r, 1):
        stop.set()
        stop = threading.Event()
        threading.Thread(target=body, args=(stop,), daemon=True).start()
    stop.set()
    os._exit(0)


def measure(period: float, trials: int) -> tuple[list[float], list[float], str]:
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(cmd_w)
        os.close(out_r)
        trigger_process(cmd_r, out_w)
    os.close(cmd_r)
    os.close(out_w)
    latencies: list[float] = []
    sweeps: list[float] = []
    with Observer() as obs:
        obs.snapshot(time.monotonic())
        mode = obs.thread_mode
        fds = obs.fds() + [out_r]
        buf = b""
        for _ in range(trials):
            os.write(cmd_w, b"g")
            want: dict[int, float] = {}
            next_sweep = time.monotonic()
            done = False
            while not done:
                timeout = max(0.0, next_sweep - time.monotonic())
                for fd in select.select(fds, [], [], timeout)[0]:
                    if fd == out_r:
                        buf += os.read(out_r, 4096)
                        while b"\n" in buf:
                            line, buf = buf.split(b"\n", 1)
                            tid, t0 = line.split()
                            want[int(tid)] = float(t0)
                    else:
                        obs.handle_readable(fd)
                if time.monotonic() >= next_sweep:
                    s0 = time.monotonic()
                    snap = obs.snapshot(s0)
                    end = time.monotonic()
                    sweeps.append(end - s0)
                    next_sweep = s0 + period
                    if want:
                        tid, t0 = next(iter(want.items()))
                        if any(t.tid == tid and t.policy == SchedClass.FIFO
                               for t in snap.threads):
                            latencies.append(end - t0)
                            done = True
    os.close(cmd_w)
    os.waitpid(pid, 0)
    os.close(out_r)
    return latencies, sweeps, mode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1000,10000")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--period-ms", default="20,100",
                    help="sweep period per size (the daemon's choice), comma-separated")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (SCHED_FIFO, proc connector, raising pid_max)")
        return 2
    sizes = [int(x) for x in args.threads.split(",")]
    periods = [float(x) / 1000 for x in args.period_ms.split(",")]
    periods += [periods[-1]] * (len(sizes) - len(periods))
    with raised_limits(max(sizes)):
        for total, period in zip(sizes, periods):
            with live_threads(total):
                live = count_threads()
                lat, sweeps, mode = measure(period, args.trials)
            ms = [x * 1e3 for x in lat]
            sw = [x * 1e3 for x in sweeps]
            target = TARGETS_MS.get(total)
            p99 = percentile(ms, 99)
            verdict = "" if target is None else \
                f" (target <= {target:.0f} ms) {'OK' if p99 <= target else 'MISSED'}"
            print(f"\n== {total} extra threads ({live} live), sweep every {period * 1e3:.0f} ms, "
                  f"thread tracking: {mode} ==")
            print(f"detection over {len(ms)} trials: p50 {percentile(ms, 50):.1f} ms, "
                  f"p99 {p99:.1f} ms, max {max(ms):.1f} ms{verdict}")
            print(f"sweep cost: median {statistics.median(sw):.2f} ms, p99 "
                  f"{percentile(sw, 99):.2f} ms = {statistics.median(sw) / (period * 1e3):.1%} "
                  "of one CPU at this period")
    return 0


if __name__ == "__main__":
    sys.exit(main())
