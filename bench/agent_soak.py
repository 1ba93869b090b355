"""Soak: `guestagent run` for --minutes with --threads sleeping threads and --churn
thread births and deaths per second; does its memory stay flat, does it see every
RT thread started meanwhile, does it log anything wrong?

A churner child process starts --churn short threads per second (each exits at
once: one fork and one exit event for the agent) and, --probe-rate times a
second, a probe thread that pins itself to one CPU, goes SCHED_FIFO and lives
long enough for the agent to see it (three of the agent's sweep intervals, as
reported by `guestagent status`, plus a second). This process polls the agent's
`hints` over its control socket and counts a probe as seen when a hint's reasons
name it ("fifo 87: ga-soak-probe[<tid>] (pinned)"): the agent's own decision, not
a side channel.
Targets: RSS growth at most 5 MB over the run; every probe seen; no ERROR or WARNING
line in the agent's log.
Run as root: python3 bench/agent_soak.py [--minutes 10] [--threads 10000] [--churn 1000]
"""

from __future__ import annotations

import argparse
import os
import re
import select
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agent_proc import cpu_seconds, rss_mib, running_agent, verdict  # noqa: E402
from observe_load import count_threads, live_threads, raised_limits  # noqa: E402

TARGET_RSS_GROWTH_MB = 5.0
PROBE_COMM = "ga-soak-probe"
PROBE_REASON = re.compile(re.escape(PROBE_COMM) + r"\[(\d+)\]")


def churner(seconds: float, rate: int, probe_rate: float, lifetime: float, prio: int,
            out_w: int) -> None:
    """Child: threads born and dead at `rate` per second; probes reported as 'p tid'."""
    threading.stack_size(64 * 1024)
    cpus = sorted(os.sched_getaffinity(0))

    def probe(cpu: int) -> None:
        tid = threading.get_native_id()
        with open(f"/proc/self/task/{tid}/comm", "w") as f:
            f.write(PROBE_COMM)
        os.sched_setaffinity(0, {cpu})
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
        os.write(out_w, f"p {tid}\n".encode())
        time.sleep(lifetime)

    start = time.monotonic()
    births = probes = 0
    step = 0.01
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        want = int((now - start) * rate)
        while births < want:
            threading.Thread(target=int, daemon=True).start()  # born and dead at once
            births += 1
        if probes < int((now - start) * probe_rate) + 1:
            threading.Thread(target=probe, args=(cpus[probes % len(cpus)],),
                             daemon=True).start()
            probes += 1
        time.sleep(max(0.0, step - (time.monotonic() - now)))
    elapsed = time.monotonic() - start
    time.sleep(lifetime + 0.5)  # let the last probes finish
    os.write(out_w, f"done {births} {elapsed!r}\n".encode())
    os._exit(0)


def seen_probes(agent) -> set[int]:
    out = set()
    for vcpu in agent.ask("hints")["vcpus"]:
        for reason in vcpu["reasons"]:
            out.update(int(t) for t in PROBE_REASON.findall(reason))
    return out


def soak(args: argparse.Namespace) -> None:
    with running_agent() as agent:
        time.sleep(args.settle)
        interval = agent.status_cli()["sweep_interval_ms"] / 1000
        lifetime = 3 * interval + 1.0
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(out_r)
            churner(args.minutes * 60, args.churn, args.probe_rate, lifetime, args.prio, out_w)
        os.close(out_w)
        rss0, cpu0, t0 = rss_mib(agent.pid), cpu_seconds(agent.pid), time.monotonic()
        rss: list[tuple[float, float]] = [(0.0, rss0)]
        started: set[int] = set()
        seen: set[int] = set()
        done: tuple[int, float] | None = None
        buf, next_sample = b"", t0
        while done is None:
            if select.select([out_r], [], [], args.poll)[0]:
                data = os.read(out_r, 65536)
                if not data:
                    raise RuntimeError("the churner died")
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    kind, *rest = line.split()
                    if kind == b"p":
                        started.add(int(rest[0]))
                    else:
                        done = (int(rest[0]), float(rest[1]))
            seen |= seen_probes(agent) & started if started else set()
            if time.monotonic() >= next_sample:
                rss.append((time.monotonic() - t0, rss_mib(agent.pid)))
                next_sample += 5.0
        os.waitpid(pid, 0)
        os.close(out_r)
        seen |= seen_probes(agent) & started
        rss.append((time.monotonic() - t0, rss_mib(agent.pid)))
        cpu = (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0) * 100
        status = agent.status_cli()
        problems = agent.log_lines()
    report(args, done, lifetime, rss, cpu, started, seen, status, problems)


def report(args, done, lifetime, rss, cpu, started, seen, status, problems) -> None:
    births, elapsed = done
    first, last = rss[0][1], rss[-1][1]
    peak = max(r for _, r in rss)
    half = [r for t, r in rss if t >= rss[-1][0] / 2]
    growth_mb = (last - first) * 1.048576
    print(f"\n== soak: {args.minutes:g} min, {args.threads} extra threads, "
          f"{births / elapsed:.0f} thread births+deaths/s achieved "
          f"(asked {args.churn}), probes every {1 / args.probe_rate:g} s living "
          f"{lifetime:.1f} s ==")
    print(f"agent: {status['threads']} threads known via {status['thread_events']}, "
          f"{status['sweeps']} sweeps, last sweep {status['sweep_ms']:.2f} ms, interval "
          f"{status['sweep_interval_ms']:.0f} ms, errors {status['errors'] or 'none'}")
    print(f"rss: {first:.1f} MiB at the start, {last:.1f} MiB at the end, peak {peak:.1f} MiB; "
          f"growth {growth_mb:.2f} MB (target <= {TARGET_RSS_GROWTH_MB:g} MB) "
          f"{verdict(growth_mb, TARGET_RSS_GROWTH_MB)}; second half "
          f"{(half[-1] - half[0]) * 1.048576:+.2f} MB")
    missed = sorted(started - seen)
    print(f"probes: {len(seen)} of {len(started)} FIFO probe threads seen in the agent's "
          f"hints {'OK' if not missed and started else 'MISSED'}"
          + (f"; not seen: {missed[:20]}" if missed else ""))
    print(f"cpu: {cpu:.2f} % of one CPU over the run (churn and hints polling included)")
    print(f"log: {len(problems)} warning/error lines "
          f"{'OK' if not problems else 'MISSED'}"
          + "".join(f"\n  {p}" for p in problems[:20]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=10000)
    ap.add_argument("--churn", type=int, default=1000, help="thread births per second")
    ap.add_argument("--probe-rate", type=float, default=2.0, help="FIFO probes per second")
    ap.add_argument("--prio", type=int, default=87, help="the probes' FIFO priority")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds before the churn")
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between hints polls")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (SCHED_FIFO, proc connector, raising pid_max)")
        return 2
    with raised_limits(args.threads + args.churn), live_threads(args.threads):
        print(f"{count_threads()} live threads; soaking for {args.minutes:g} minutes",
              flush=True)
        soak(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
