"""Mode "guestagent": the only code that knows how to run the guest agent and the host
service beside the latency guest."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

from testbed.vm import GuestVM, VMError

# Python starting in a TCG guest over 9p takes minutes on a shared 2-CPU machine.
AGENT_START_TIMEOUT = 300.0
SETTLE_TIMEOUT = 60.0


class ServiceError(Exception):
    """The agent or the host service did not come up."""


@dataclass(frozen=True)
class ServiceMode:
    title: str  # for the record of a run
    argv: Callable[[GuestVM, str], list[str]]  # (the guest, the status socket) -> command


def _serve_argv(vm: GuestVM, status_socket: str, settings: str = "") -> list[str]:
    """The host service for a whole host, confined to this guest: a drop-in names it, and
    an empty libvirt status directory keeps other people's domains on a shared machine out.
    Default limits, budgets and emulator policy, unless ``settings`` adds [host] keys."""
    dropins, libvirt = vm.workdir / "vms.d", vm.workdir / "no-libvirt"
    dropins.mkdir(exist_ok=True)
    libvirt.mkdir(exist_ok=True)
    (dropins / "latency.toml").write_text(
        f'qmp = "{vm.peer_qmp_sock}"\nchannel = "{vm.hints_sock}"\n')
    config = vm.workdir / "host.toml"
    config.write_text(f'[host]\ndropin_dir = "{dropins}"\nlibvirt_status_dir = "{libvirt}"\n'
                      + settings)
    return [sys.executable, "-m", "guestagent.host.cli", "serve", "--config", str(config),
            "--status-socket", status_socket, "--state-dir", str(vm.workdir / "state")]


# As a host runs it: `serve`, whose emulator policy ("follow" under TCG) boosts QEMU's main
# loop beside a boosted vCPU, where the guest's timers run (`run` boosts vCPU threads only).
HOST_SERVICE = ServiceMode(
    "`guestagent-host serve`, default limits, budgets and emulator policy "
    "(\"follow\" under TCG, \"never\" under KVM)",
    _serve_argv)

# The same with a budget no window can spend (the schema's largest): the hints alone,
# to tell what they give from what the budget, a host-side safety limit, takes back.
UNBUDGETED = 3600.0
HOST_SERVICE_UNBUDGETED = ServiceMode(
    f"the same with `boost_budget = {UNBUDGETED:.0f}` (seconds), a budget no window spends",
    lambda vm, status_socket: _serve_argv(vm, status_socket,
                                          f"boost_budget = {UNBUDGETED}\n"))
SERVICE_MODES = {"guestagent": HOST_SERVICE, "unbudgeted": HOST_SERVICE_UNBUDGETED}


def service_unavailable() -> str | None:
    """Why mode "guestagent" cannot run here, or None."""
    checks = {
        "guestagent run": [sys.executable, "-m", "guestagent", "run", "--help"],
        "guestagent-host": [sys.executable, "-m", "guestagent.host.cli", "--help"],
    }
    for name, argv in checks.items():
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return f"`{name}` is not available ({why})"
    return None


def _status(status_socket: str) -> dict | None:
    """The guest's status document: `run` answers with it, `serve` lists it under "vms"."""
    from guestagent.errors import GuestagentError
    from guestagent.host.status import fetch

    try:
        doc = fetch(status_socket)
    except (GuestagentError, OSError, ValueError):
        return None
    if not doc.get("service"):
        return doc
    served = [vm for vm in doc.get("vms", []) if vm.get("served")]
    return served[0] if served else None


def link_up(status_socket: str) -> bool:
    """The host side has negotiated with a running guest agent."""
    doc = _status(status_socket)
    return bool(doc) and doc.get("link_state") == "up" and doc.get("guest_state") == "RUNNING"


def applied_summary(status_socket: str) -> str:
    """What the host side applied to each vCPU thread, one line, to read the figures by."""
    doc = _status(status_socket)
    if doc is None:
        return "host service status unavailable"
    parts = [f"vCPU {v['vcpu']}: {','.join(v['applied']) or 'nothing'} ({v['policy']})"
             for v in doc.get("vcpus", [])]
    emulator = doc.get("emulator")
    if isinstance(emulator, dict):
        parts.append(f"main loop: {emulator.get('policy')}, budget left "
                     f"{emulator.get('budget_left')} s")
    # Each expiry ended every boost until the agent's next heartbeat.
    counters = doc.get("counters") or {}
    parts.append(f"lease expired {counters.get('lease_expiries', 0)} times")
    return "; ".join(parts)


AGENT_CONFIG = (
    "[agent]\n"
    # Heartbeats twice a second keep the host's 1.5 s lease safe from TCG timer jitter.
    "heartbeat_interval_ms = 500\n"
    "[transport]\n"
    'mode = "channel"\n'
    "[control]\n"
    # In the guest's own /run: the workdir is a 9p share.
    'socket = "/run/guestagent-bench.sock"\n'
)


@contextlib.contextmanager
def guestagent_running(vm: GuestVM, tag: str, log, settled: Callable[[], bool],
                       host: ServiceMode = HOST_SERVICE) -> Iterator[None]:
    """`guestagent run` in the guest over the hints port, the host service beside QEMU;
    enters once they have negotiated and ``settled()`` holds: the agent's start-up (seconds
    of Python under TCG, on whichever vCPU is free) is not what a long-running agent costs."""
    config = vm.workdir / "guestagent.toml"
    config.write_text(AGENT_CONFIG)
    status_socket = str(vm.workdir / f"service-{tag}.status")
    service_log = open(vm.workdir / f"service-{tag}.log", "wb")
    service = subprocess.Popen(host.argv(vm, status_socket),
                               stdout=service_log, stderr=subprocess.STDOUT)
    agent = vm.spawn([sys.executable, "-m", "guestagent", "run", "--config", str(config)])
    try:
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while not link_up(status_socket):
            for name, dead in (("host service", service.poll() is not None),
                               ("agent", vm.wait(agent, timeout=0).rc is not None)):
                if dead:
                    raise ServiceError(f"the {name} exited at start"
                                       + _why(vm, agent, service_log.name))
            if time.monotonic() > deadline:
                raise ServiceError(f"agent and host service not linked after "
                                   f"{AGENT_START_TIMEOUT:.0f} s" + _why(vm, agent,
                                                                         service_log.name))
            time.sleep(0.2)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while not settled():
            if time.monotonic() > deadline:
                log(f"guestagent {tag}: not settled after {SETTLE_TIMEOUT:.0f} s; measuring")
                break
            time.sleep(0.2)
        yield
        log(f"guestagent {tag}: at the end, {applied_summary(status_socket)}")
    finally:
        _stop_agent(vm, agent)
        service.terminate()  # the host side restores every thread it changed on SIGTERM
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        service_log.close()


def _stop_agent(vm: GuestVM, agent: int) -> None:
    """SIGTERM, then SIGKILL: the next window's agent needs the hints port, which only one
    process can hold open."""
    for signum, wait in ((15, AGENT_START_TIMEOUT / 2), (9, 30.0)):
        try:
            vm.signal(agent, signum)
        except VMError:
            return  # already reaped
        if vm.wait(agent, timeout=wait).rc is not None:
            return


def _why(vm: GuestVM, agent: int, service_log: str) -> str:
    """The agent's and the host service's last words, for a one-line error."""
    _stop_agent(vm, agent)
    agent_err = vm.wait(agent, timeout=0).stderr.strip().splitlines()[-3:]
    try:
        with open(service_log, errors="replace") as f:
            service_err = f.read().strip().splitlines()[-3:]
    except OSError:
        service_err = []
    return printable(f"; agent: {' | '.join(agent_err) or 'nothing'}; host service: "
                      f"{' | '.join(service_err) or 'nothing'}")


def printable(text: str) -> str:
    """Guest text escaped before it reaches a terminal."""
    return "\n".join("".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
                     for line in text.split("\n"))
