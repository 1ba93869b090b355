"""Guest and host scheduling latency under three host conditions, in a real QEMU guest.

  python3 -m bench.vm_latency [--seconds 60] [--modes idle,hogs,agent] [--png FILE]

Modes: idle (host idle); hogs (one CPU hog per host CPU, no guestagent); agent (the
same hogs, with `guestagent run` in the guest and `guestagent-host run` on the host).
In each mode cyclictest runs in the guest (-p95) and, at the same time, on the host at a
priority below what the host peer grants, to show what boosting the vCPUs costs the host.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: testbed/ sits at the root
    sys.path.insert(0, str(REPO_ROOT))

from bench.vm_latency.cyclictest import (  # noqa: E402
    Histogram,
    cyclictest_argv,
    parse_histogram,
    summarize,
)
from bench.vm_latency.report import MODES, ratios, table, write_png  # noqa: E402
from testbed.vm import GuestConfig, GuestVM, missing_components  # noqa: E402

GUEST_PRIORITY = 95
# The host peer grants at most FIFO 40 by default (guestagent/host/config.py), so a host
# cyclictest below that feels the boosted vCPU threads.
HOST_PRIORITY = 30
HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


class BenchError(Exception):
    """Ends the benchmark with one line."""


@contextlib.contextmanager
def cpu_hogs() -> Iterator[None]:
    """One busy process pinned to each host CPU, at the default policy and nice."""
    procs = [subprocess.Popen([sys.executable, "-c", HOG, str(cpu)])
             for cpu in sorted(os.sched_getaffinity(0))]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


# --- mode "agent": the only code that knows how to run guestagent and its host peer ------


def agent_unavailable() -> str | None:
    """Why mode "agent" cannot run here, or None."""
    checks = {
        "guestagent run": [sys.executable, "-m", "guestagent", "run", "--help"],
        "guestagent-host run": [sys.executable, "-c",
                                "import sys; from guestagent.host.cli import main; "
                                "sys.exit(main(['run', '--help']))"],
    }
    for name, argv in checks.items():
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return f"`{name}` is not available yet ({why})"
    return None


AGENT_START_TIMEOUT = 120.0  # Python starting in a TCG guest on a busy machine is slow


def peer_link_up(status_socket: str) -> bool:
    """The host peer has negotiated with a running guest agent."""
    from guestagent.errors import GuestagentError
    from guestagent.host.status import fetch

    try:
        doc = fetch(status_socket)
    except (GuestagentError, OSError, ValueError):
        return False
    return doc.get("link_state") == "up" and doc.get("guest_state") == "RUNNING"


def applied_summary(status_socket: str) -> str:
    """What the host peer applied to each vCPU thread, one line, to read the figures by."""
    from guestagent.errors import GuestagentError
    from guestagent.host.status import fetch

    try:
        doc = fetch(status_socket)
    except (GuestagentError, OSError, ValueError) as err:
        return f"host peer status unavailable ({err})"
    return "; ".join(f"vCPU {v['vcpu']}: {','.join(v['applied']) or 'nothing'} ({v['policy']})"
                     for v in doc.get("vcpus", []))


@contextlib.contextmanager
def guestagent_running(vm: GuestVM) -> Iterator[None]:
    """`guestagent run` in the guest over the virtio-serial port, the host peer beside QEMU."""
    config = vm.workdir / "guestagent.toml"
    # The control socket lives in the guest's own /run: the workdir is a 9p share.
    # Heartbeats twice a second keep the peer's 1.5 s lease safe from TCG timer jitter.
    config.write_text(
        "[agent]\n"
        "heartbeat_interval_ms = 500\n"
        "[transport]\n"
        'mode = "channel"\n'
        "[control]\n"
        'socket = "/run/guestagent-bench/control.sock"\n'
    )
    status_socket = str(vm.workdir / "peer.status")
    peer_log = open(vm.workdir / "peer.log", "wb")
    peer = subprocess.Popen(
        [sys.executable, "-m", "guestagent.host.cli", "run", "--qmp", vm.peer_qmp_sock,
         "--channel", vm.hints_sock, "--status-socket", status_socket],
        stdout=peer_log, stderr=subprocess.STDOUT)
    agent = vm.spawn([sys.executable, "-m", "guestagent", "run", "--config", str(config)])
    try:
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while not peer_link_up(status_socket):  # measure only once they have negotiated
            for name, dead in (("host peer", peer.poll() is not None),
                               ("agent", vm.wait(agent, timeout=0).rc is not None)):
                if dead:
                    raise BenchError(f"the {name} exited at start; see {vm.workdir}")
            if time.monotonic() > deadline:
                raise BenchError(f"agent and host peer not linked after "
                                 f"{AGENT_START_TIMEOUT:.0f} s; see {vm.workdir}/peer.log")
            time.sleep(0.5)
        yield
        print("vm_latency: agent: at the end, " + applied_summary(status_socket),
              file=sys.stderr, flush=True)
    finally:
        vm.signal(agent, 15)
        vm.wait(agent, timeout=10)
        peer.terminate()  # the peer restores every vCPU thread on SIGTERM
        try:
            peer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()
        peer_log.close()


# --- measuring -----------------------------------------------------------------------------


def measure(vm: GuestVM, mode: str, seconds: int, hist_us: int) -> dict[str, Histogram]:
    """cyclictest in the guest and on the host at the same time; both histograms."""
    guest_file = vm.workdir / f"guest-{mode}.hist"
    host_file = vm.workdir / f"host-{mode}.hist"
    gpid = vm.spawn(cyclictest_argv(seconds, GUEST_PRIORITY, hist_us, str(guest_file)))
    host = subprocess.run(cyclictest_argv(seconds, HOST_PRIORITY, hist_us, str(host_file)),
                          capture_output=True, text=True, timeout=seconds + 60)
    guest = vm.wait(gpid, timeout=seconds + 120)
    if guest.rc is None:
        raise BenchError(f"guest cyclictest still running {seconds + 120} s into a "
                         f"{seconds} s run")
    out = {}
    for side, path, rc, err in (("guest", guest_file, guest.rc, guest.stderr),
                                ("host", host_file, host.returncode, host.stderr)):
        try:
            out[side] = parse_histogram(path.read_text() if path.exists() else "")
        except ValueError as e:
            raise BenchError(f"{side} cyclictest ({mode}, rc {rc}): {e}: "
                             f"{err.strip()[:200]}") from None
    return out


def run(args: argparse.Namespace) -> int:
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise BenchError(f"unknown mode(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(MODES)}")
    missing = missing_components()
    if missing:
        raise BenchError("cannot boot a guest: missing " + "; ".join(missing))
    if "agent" in modes:
        reason = agent_unavailable()
        if reason:
            raise BenchError(f"mode agent: {reason}; run with --modes idle,hogs")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("the histogram PNG needs matplotlib: "
                         "python3 -m pip install matplotlib") from None

    hists: dict[str, dict[str, Histogram]] = {}
    # The agent mode needs the hints port; ivshmem is left out so the agent uses the channel.
    with GuestVM(config=GuestConfig(ivshmem=False)) as vm:
        for mode in modes:
            print(f"vm_latency: {mode}: {args.seconds} s ...", file=sys.stderr, flush=True)
            with contextlib.ExitStack() as stack:
                if mode in ("hogs", "agent"):
                    stack.enter_context(cpu_hogs())
                if mode == "agent":
                    stack.enter_context(guestagent_running(vm))
                hists[mode] = measure(vm, mode, args.seconds, args.hist_us)
    results = {m: {side: summarize(h) for side, h in sides.items()}
               for m, sides in hists.items()}
    accel = "KVM" if os.environ.get("GUESTAGENT_VM_KVM") == "1" else "TCG"
    print(f"cyclictest -m -p{GUEST_PRIORITY} -i 1000 --smp, {args.seconds} s per mode; "
          f"guest: QEMU {accel}, 2 vCPUs; host: -p{HOST_PRIORITY}, {os.cpu_count()} CPUs")
    print(table(results, args.hist_us))
    print()
    for line in ratios(results):
        print(line)
    write_png(args.png, hists, f"cyclictest latency, {args.seconds} s per mode ({accel})")
    print(f"\nhistogram: {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vm_latency", description=__doc__.split("\n")[1])
    parser.add_argument("--seconds", type=int, default=60, help="per mode (default 60)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of idle,hogs,agent (default: all)")
    parser.add_argument("--hist-us", type=int, default=20000,
                        help="histogram range in µs; above it counts as overflow")
    parser.add_argument("--png", default="bench/out/vm_latency.png",
                        help="where to write the plot (default bench/out/vm_latency.png)")
    args = parser.parse_args(argv)
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    try:
        return run(args)
    except BenchError as err:
        print(f"vm_latency: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
