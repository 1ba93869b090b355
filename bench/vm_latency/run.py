"""Hints against static real-time and against nothing, on an oversubscribed host.

  python3 -m bench.vm_latency [--seconds 60] [--rounds 3] [--modes idle,none,...]

One guest is booted once; the modes then take turns, interleaved, for --rounds rounds:
  idle        no host load (the reference: the least latency this machine gives)
  none        the host load, nothing boosted
  static      the host load; every vCPU thread and QEMU's main loop SCHED_FIFO 1 for the
              whole window, as Nova (hw:cpu_realtime), KubeVirt and libvirt do it
  guestagent  the host load; the agent in the guest, the host service beside QEMU
  unbudgeted  as guestagent, with a boost budget no window spends: the hints alone
  isolated    the latency path (vCPU 1's thread and QEMU's main loop) alone on the last
              CPU; the host load and QEMU's other threads on the others

The host load: --load-per-cpu busy workers pinned to each CPU the vCPU threads run on,
counting the work they do. The latency guest runs cyclictest at FIFO 95 pinned on vCPU 1
while vCPU 0 runs a nice-19 busy loop; the host runs its own cyclictests at the same
time, one at FIFO 30 (below the host service's cap, 40) and one at SCHED_OTHER.
A full run (every mode, --seconds 60 or more, 3 rounds or more) writes docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: testbed/ sits at the root
    sys.path.insert(0, str(REPO_ROOT))

from bench.vm_latency import hostservice, qemu_threads, report  # noqa: E402
from bench.vm_latency.cyclictest import (  # noqa: E402
    Histogram,
    parse_histogram,
    pinned_argv,
    smp_argv,
)
from bench.vm_latency.figures import (  # noqa: E402
    WindowResult,
    guest_busy,
    load_rate,
    mode_figures,
)
from bench.vm_latency.hostload import HostLoad, LoadError  # noqa: E402
from bench.vm_latency.targets import reference_lines, target_lines  # noqa: E402
from bench.vm_latency.timeline import (  # noqa: E402
    MAIN_THREAD,
    Window,
    boosted_by_mode,
    cpu_by_mode,
    first_boost,
    segments,
)
from guestagent.errors import GuestagentError  # noqa: E402
from guestagent.linux.procfs import CpuTimes, ParseError, parse_proc_stat_times  # noqa: E402
from testbed.vm import GuestConfig, GuestVM, VMError, missing_components  # noqa: E402

MODES = report.MODES
GUEST_PRIORITY = 95
GUEST_RT_VCPU = 1  # cyclictest's vCPU; the batch loop runs on vCPU 0
# Below the host service's default cap (FIFO 40, guestagent/host/config.py), so this host
# cyclictest feels a boosted vCPU thread; above static's FIFO 1.
HOST_RT_PRIORITY = 30
GUEST_BATCH = ("import os\nos.sched_setaffinity(0, {0})\nos.nice(19)\n"
               "while True:\n    pass\n")
BOOT_TIMEOUT = 300.0
# The guest answers slowly when its vCPU 0 shares a CPU with the whole host load
# (isolated): a spawn once took over 60 s there.
SPAWN_TIMEOUT = 240.0
FULL_RUN = {"seconds": 60, "rounds": 3}
DOC = REPO_ROOT / "docs" / "performance.md"
DOC_PNG = REPO_ROOT / "docs" / "performance.png"


class BenchError(Exception):
    """Ends the benchmark with one line."""


def log(msg: str) -> None:
    print(f"vm_latency: {msg}", file=sys.stderr, flush=True)


def rounds_order(modes: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, mode) in run order: each round starts one mode later, so no mode always
    follows the same one."""
    n = len(modes)
    return [(r, modes[(r + i) % n]) for r in range(rounds) for i in range(n)]


# --- one window ------------------------------------------------------------------------


class Bench:
    def __init__(self, vm: GuestVM, load: HostLoad, sampler: qemu_threads.Sampler,
                 args: argparse.Namespace) -> None:
        self.vm = vm
        self.load = load
        self.sampler = sampler
        self.args = args
        self.vcpus = vm.vcpu_threads()
        if len(self.vcpus) < 2:
            raise BenchError(f"expected 2 vCPU threads, found {self.vcpus}")

    def batch_vcpu_lowered(self) -> bool:
        """The host has applied the agent's first hints: the batch vCPU runs niced."""
        batch = next(tid for v, tid in self.vcpus.items() if v != GUEST_RT_VCPU)
        return os.getpriority(os.PRIO_PROCESS, batch) > 0

    def nothing_left(self, mode: str) -> None:
        """After a window no QEMU thread may stay RT or niced into the next mode's (a vCPU
        left at nice 10 starves the guest under isolated's crowded CPU); say so if one
        did, and put it back."""
        names = qemu_threads.qemu_tasks(self.vm.qemu_pid)
        left = qemu_threads.changed_threads(self.vm.qemu_pid)
        if left:
            log(f"after {mode}: still RT or niced, now put back: "
                + ", ".join(names.get(t, str(t)) for t in sorted(left)))
            qemu_threads.lower(left)

    @contextlib.contextmanager
    def mode(self, mode: str, round_: int) -> Iterator[None]:
        """The host as the mode wants it, for the length of one window."""
        with contextlib.ExitStack() as stack:
            stack.callback(self.nothing_left, mode)
            if mode == "idle":
                self.load.pause()
                stack.callback(self.load.resume)
            elif mode == "static":
                stack.enter_context(qemu_threads.static_rt(
                    self.vm.qemu_pid, [*self.vcpus.values(), self.vm.qemu_pid]))
            elif mode in hostservice.SERVICE_MODES:
                stack.enter_context(hostservice.guestagent_running(
                    self.vm, f"{mode}-{round_}", log, self.batch_vcpu_lowered,
                    hostservice.SERVICE_MODES[mode]))
            elif mode == "isolated":
                cpus = sorted(os.sched_getaffinity(0))
                stack.enter_context(qemu_threads.pinned(
                    self.vm.qemu_pid, [self.vcpus[GUEST_RT_VCPU], self.vm.qemu_pid],
                    cpus[-1], set(cpus[:-1])))
                self.load.confine(cpus[:-1])
                stack.callback(self.load.rehome)
            yield

    def measure(self, mode: str, round_: int) -> tuple[WindowResult, Window]:
        """The three cyclictests at once, the load's work over the same window."""
        secs, hist_us, work = self.args.seconds, self.args.hist_us, self.vm.workdir
        files = {side: work / f"{side}-{mode}-{round_}.hist"
                 for side in ("guest", "host_rt", "host_other")}
        stat_before = self.guest_stat()  # before the cyclictests: they start together
        host = {side: subprocess.Popen(smp_argv(secs, prio, hist_us, str(files[side])),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
                for side, prio in (("host_rt", HOST_RT_PRIORITY), ("host_other", 0))}
        before = self.load.sample()
        asked = time.monotonic()
        gpid = self.vm.spawn(pinned_argv(secs, GUEST_PRIORITY, GUEST_RT_VCPU, hist_us,
                                         str(files["guest"])), timeout=SPAWN_TIMEOUT)
        started = time.monotonic()  # the guest said its RT task's process has started
        if started - asked > secs / 10:
            log(f"{mode} round {round_ + 1}: the guest took {started - asked:.0f} s to start "
                f"cyclictest; the host's cyclictests ran that much ahead of it")
        seen = {}
        if mode in hostservice.SERVICE_MODES:
            seen = qemu_threads.probe_boost(
                {"vcpu": self.vcpus[GUEST_RT_VCPU], "main": self.vm.qemu_pid},
                timeout=min(secs, 15))
        errors = {}
        for side, proc in host.items():
            try:
                _, errors[side] = proc.communicate(timeout=secs + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise BenchError(f"host cyclictest ({side}) still running {secs + 60} s "
                                 f"into a {secs} s window") from None
        after = self.load.sample()
        guest = self.vm.wait(gpid, timeout=secs + 120)
        if guest.rc is None:
            raise BenchError(f"guest cyclictest still running {secs + 120} s into a "
                             f"{secs} s window")
        errors["guest"] = guest.stderr
        stat_after = self.guest_stat()
        hists: dict[str, Histogram] = {}
        for side, path in files.items():
            try:
                hists[side] = parse_histogram(path.read_text() if path.exists() else "")
            except ValueError as e:
                raise BenchError(f"{side} cyclictest ({mode}): {e}: "
                                 f"{errors.get(side, '').strip()[:200]}") from None
            path.unlink()
        work_per_s, cpus = load_rate(before, after)
        window = Window(mode, round_, before.t, after.t)

        def delay(key: str, name: str) -> float | None:
            if mode not in hostservice.SERVICE_MODES:
                return None
            t = seen.get(key)
            if t is None:  # not within the probe: the sampler may still have seen it
                t = first_boost(self.sampler.snapshot(), name, started)
                t = t if t is not None and t <= after.t else None
            return None if t is None else max(0.0, t - started)

        vcpu_name = qemu_threads.qemu_tasks(self.vm.qemu_pid).get(
            self.vcpus[GUEST_RT_VCPU], "")
        result = WindowResult(mode, round_, after.t - before.t, hists, work_per_s, cpus,
                              delay("vcpu", vcpu_name), delay("main", MAIN_THREAD),
                              guest_busy(stat_before, stat_after))
        return result, window

    def guest_stat(self) -> dict[int, CpuTimes]:
        """The guest's /proc/stat per vCPU, or {} (then the window has no busy figure)."""
        try:
            return parse_proc_stat_times(
                self.vm.run(["cat", "/proc/stat"], timeout=SPAWN_TIMEOUT).stdout)
        except (VMError, ParseError) as e:
            log(f"the guest's /proc/stat is unread: {hostservice.printable(str(e))}")
            return {}


# --- the run ---------------------------------------------------------------------------


def machine_lines(accel: str, args: argparse.Namespace,
                  load_before: tuple[float, float, float]) -> list[str]:
    """The host, the guest and the load, for the record; called at the end of the run, so
    the load average is given as it was before and as it is after."""
    def first(cmd: Sequence[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        return (out.splitlines() or ["unknown"])[0]

    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                     model)
    after = os.getloadavg()
    rt = "unknown"
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/sys/kernel/sched_rt_runtime_us") as f:
            runtime = int(f.read())
        with open("/proc/sys/kernel/sched_rt_period_us") as f:
            rt = "none" if runtime < 0 else f"{runtime / int(f.read()):.0%} of each period"
    return [
        f"host: {os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
        f"load average (1 / 5 / 15 min) {_loadavg(load_before)} before the run, "
        f"{_loadavg(after)} after it (the run's own load included); RT throttling: {rt}",
        f"guest: {first(['qemu-system-x86_64', '--version'])}, accelerator {accel}, "
        f"2 vCPUs, 1 GiB, virtme-ng",
        f"host load: {args.load_per_cpu} busy workers pinned to each of the "
        f"{len(os.sched_getaffinity(0))} CPUs; host cyclictest FIFO {HOST_RT_PRIORITY} "
        f"and SCHED_OTHER on every CPU; guest cyclictest FIFO {GUEST_PRIORITY} on vCPU "
        f"{GUEST_RT_VCPU}, nice-19 busy loop on vCPU 0",
        f"host service (mode guestagent): {hostservice.HOST_SERVICE.title}; "
        f"(mode unbudgeted): {hostservice.HOST_SERVICE_UNBUDGETED.title}",
        "second, batch-only guest: not run (a 2-CPU host has no room for it)",
    ]


def _loadavg(avg: Sequence[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in avg)


def check_environment(modes: Sequence[str]) -> None:
    missing = missing_components()
    if missing:
        raise BenchError("cannot boot a guest: missing " + "; ".join(missing))
    if not shutil.which("cyclictest"):
        raise BenchError("cyclictest is missing (Debian package rt-tests)")
    if os.geteuid() != 0:
        raise BenchError("needs root: cyclictest's RT threads and setting QEMU's threads")
    served = [m for m in modes if m in hostservice.SERVICE_MODES]
    if served:
        reason = hostservice.service_unavailable()
        if reason:
            raise BenchError(f"mode {served[0]}: {reason}")
    if "isolated" in modes and len(os.sched_getaffinity(0)) < 2:
        raise BenchError("mode isolated needs at least 2 CPUs")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("the plot needs matplotlib: python3 -m pip install matplotlib") \
            from None


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise BenchError(f"unknown mode(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(MODES)}")
    check_environment(modes)
    load_before = os.getloadavg()
    began = time.monotonic()
    results: list[WindowResult] = []
    windows: list[Window] = []
    cpus = sorted(os.sched_getaffinity(0))
    # ivshmem is left out so the agent uses the hints port; a shared machine boots slowly.
    with GuestVM(config=GuestConfig(ivshmem=False, boot_timeout=BOOT_TIMEOUT)) as vm, \
            HostLoad(cpus, args.load_per_cpu) as load, \
            qemu_threads.Sampler(vm.qemu_pid) as sampler:
        booted = time.monotonic()
        accel = qemu_threads.accelerator(vm.qemu_pid)
        log(f"guest up in {booted - began:.0f} s ({accel}); {len(modes)} modes x "
            f"{args.rounds} rounds x {args.seconds} s")
        vm.spawn([sys.executable, "-c", GUEST_BATCH])
        bench = Bench(vm, load, sampler, args)
        for round_, mode in rounds_order(modes, args.rounds):
            log(f"round {round_ + 1}/{args.rounds}: {mode}, {args.seconds} s ...")
            with bench.mode(mode, round_):
                result, window = bench.measure(mode, round_)
            results.append(result)
            windows.append(window)
        measured = time.monotonic()
        samples = sampler.snapshot()
        machine = machine_lines(accel, args, load_before)
    timeline = segments(samples, end=windows[-1].end, gone_after=qemu_threads.GONE_AFTER)
    figures = mode_figures(results, boosted_by_mode(timeline, windows),
                           cpu_by_mode(samples, windows))
    tables = [report.latency_table(figures, args.hist_us), report.host_table(figures)]
    targets, references = target_lines(figures), reference_lines(figures)
    delays = [line for mode in hostservice.SERVICE_MODES
              for line in report.delay_lines(figures, mode)]
    print(f"{accel} guest; {args.rounds} rounds x {args.seconds} s per mode, interleaved")
    for head, lines in (("", ["\n\n".join(tables)]), ("", delays),
                        ("targets (ratios from this run):", targets),
                        ("for reading them:", references)):
        if lines:
            print("\n".join(([head] if head else []) + list(lines)) + "\n")
    title = (f"vm_latency: {accel}, {args.rounds} rounds x {args.seconds} s per mode, "
             f"{os.cpu_count()} host CPUs")
    report.write_png(args.png, figures, timeline, windows, title)
    print(f"plot: {args.png}")
    total = time.monotonic() - began
    print(full_run_estimate(total, booted - began, measured - booted, len(windows), args,
                            len(MODES)))
    full = is_full_run(modes, args)
    if args.record or full:
        place_plot(args.png, DOC_PNG)
        command = "python3 -m bench.vm_latency " + shlex.join(argv)
        DOC.write_text(report.performance_md(report.RunRecord(
            command=command.strip(),
            when=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            machine=machine, duration_s=total, tables=tables, targets=targets,
            references=references, delays=delays, png=DOC_PNG.name, full=full,
            note=args.note)))
        print(f"recorded: {DOC.relative_to(REPO_ROOT)} and {DOC_PNG.relative_to(REPO_ROOT)}")
    else:
        print(f"not recorded in {DOC.relative_to(REPO_ROOT)}: a short run (a full run has "
              f"every mode, --seconds {FULL_RUN['seconds']} and --rounds {FULL_RUN['rounds']} "
              "or more; --record forces it)")
    return 0


def is_full_run(modes: Sequence[str], args: argparse.Namespace) -> bool:
    return (set(modes) >= set(MODES) and args.seconds >= FULL_RUN["seconds"]
            and args.rounds >= FULL_RUN["rounds"])


def full_run_estimate(total: float, boot: float, measuring: float, windows: int,
                      args: argparse.Namespace, all_modes: int) -> str:
    """How long this run took, and from its own overheads how long a full run takes."""
    per_window = max(0.0, measuring / windows - args.seconds)
    full_windows = all_modes * max(args.rounds, FULL_RUN["rounds"])
    full = (total - measuring) + full_windows * (max(args.seconds, FULL_RUN["seconds"])
                                                 + per_window)
    return (f"this run took {total / 60:.1f} min (boot {boot:.0f} s, {per_window:.0f} s of "
            f"overhead per window); a full run takes about {full / 60:.0f} min here")


def place_plot(png: str, dest: Path) -> None:
    """The plot beside docs/performance.md, unless --png already wrote it there."""
    if Path(png).resolve() != dest.resolve():
        shutil.copyfile(png, dest)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vm_latency", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[3:]))
    parser.add_argument("--seconds", type=int, default=FULL_RUN["seconds"],
                        help=f"per window (default {FULL_RUN['seconds']})")
    parser.add_argument("--rounds", type=int, default=FULL_RUN["rounds"],
                        help=f"interleaved rounds of every mode (default {FULL_RUN['rounds']})")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    parser.add_argument("--load-per-cpu", type=int, default=2,
                        help="host busy workers pinned to each CPU (default 2)")
    parser.add_argument("--hist-us", type=int, default=100000,
                        help="histogram range in µs; above it counts as overflow")
    parser.add_argument("--png", default="bench/out/vm_latency.png",
                        help="where to write the plot (default bench/out/vm_latency.png)")
    parser.add_argument("--record", action="store_true",
                        help="write docs/performance.md even for a short run")
    parser.add_argument("--note", default="",
                        help="one sentence for docs/performance.md: why this run's length")
    args = parser.parse_args(argv)
    for name in ("seconds", "rounds", "load_per_cpu", "hist_us"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        return run(args, argv)
    except (BenchError, hostservice.ServiceError, LoadError) as err:
        print(f"vm_latency: error: {err}", file=sys.stderr)
        return 1
    except GuestagentError as err:  # QMP refused at boot: QEMU died (KVM that does not work)
        print(f"vm_latency: error: the guest: {hostservice.printable(str(err))}",
              file=sys.stderr)
        return 1
    except VMError as err:  # its text ends with the guest console's last lines
        print(f"vm_latency: error: the guest: {hostservice.printable(str(err))}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
