"""End to end in a real guest kernel: `guestagent run` inside a QEMU guest and
`guestagent-host run` beside QEMU, over the virtio-serial channel and over the
ivshmem region, acting on QEMU's real vCPU threads.

tests/test_daemon.py runs the same two processes on one kernel against a stand-in
QEMU. Here guest and host are different kernels, so the peer's boosts cannot feed
back into what the agent observes, and the default floating_rt stays.

One guest boot serves the whole module: the transport is chosen by the agent's
config and the peer's options, so both transports run in turn on the same guest
(a module-scoped fixture parametrised by transport).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from testbed.vm import HINTS_PORT, GuestVM, SchedState, VMError, sched_state

pytestmark = [pytest.mark.vm, pytest.mark.root]

AGENT_HEARTBEAT_MS = 200
# The peer expects a heartbeat every PEER_PERIOD and keeps a boost LEASE_PERIODS of them
# after the last one. The agent beats twice as often as the peer requires, because its
# timers run in a TCG guest on a busy machine.
PEER_PERIOD = 0.4
LEASE_PERIODS = 2.0
LEASE = PEER_PERIOD * LEASE_PERIODS
HOLD_MS = 500
GUEST_RT_PRIORITY = 30
HOST_RT_CAP = 20  # the peer's max_rt_priority: the guest's FIFO 30 is granted as FIFO 20
STEER_COMM = "e2e-steer"  # comm of the opt-in latency task (a copy of sleep)
OTHER = SchedState(os.SCHED_OTHER, 0)
BOOSTED = SchedState(os.SCHED_FIFO, HOST_RT_CAP)
# Host-side slack on top of the lease: the peer wakes on its own timer, and this 2-CPU
# machine is shared with other work.
LEASE_SLACK = 0.7


def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Poll until predicate() is truthy; its last value either way."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= end:
            return value
        time.sleep(step)


# --- the two processes under test --------------------------------------------------------


class HostPeer:
    """`guestagent-host run` on the host, beside the guest's QEMU."""

    def __init__(self, vm: GuestVM, transport: str, config: Path, log: Path) -> None:
        self.status_socket = str(vm.workdir / f"peer-{transport}.status")
        link = (["--channel", vm.hints_sock] if transport == "channel"
                else ["--region", str(vm.shm_path)])
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "guestagent.host.cli", "run", "--qmp", vm.peer_qmp_sock,
                 *link, "--config", str(config), "--contend", "0", "-v",
                 "--status-socket", self.status_socket],
                stdout=out, stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any] | None:
        """`guestagent-host status --json`; None while the peer does not answer yet."""
        if not os.path.exists(self.status_socket):
            return None
        out = subprocess.run(
            [sys.executable, "-m", "guestagent.host.cli", "status", "--json",
             "--status-socket", self.status_socket],
            capture_output=True, text=True, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def stop(self) -> int:
        """SIGTERM: the peer restores every thread it changed on the way out."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class GuestAgent:
    """`guestagent run` inside the guest, and its CLI there."""

    def __init__(self, vm: GuestVM, config: Path) -> None:
        self.vm = vm
        self.config = config
        self.pid = vm.spawn([sys.executable, "-m", "guestagent", "run", "--config", str(config)])
        self.stderr = ""

    def cli(self, *args: str) -> dict[str, Any] | None:
        """`guestagent ARGS --json` in the guest; None when it fails (no agent yet)."""
        result = self.vm.run([sys.executable, "-m", "guestagent", *args, "--json",
                              "--config", str(self.config)], timeout=60)
        return json.loads(result.stdout) if result.rc == 0 else None

    def running(self) -> bool:
        if self.vm.wait(self.pid, timeout=0).rc is None:
            return True
        self.stderr = self.vm.wait(self.pid, timeout=0).stderr
        return False

    def stop(self, signum: int = signal.SIGTERM) -> int | None:
        if self.running():
            self.vm.signal(self.pid, signum)
        done = self.vm.wait(self.pid, timeout=20)
        self.stderr = done.stderr
        return done.rc


def agent_config(vm: GuestVM, transport: str) -> Path:
    path = vm.workdir / f"guestagent-{transport}.toml"
    path.write_text(f"""\
[agent]
heartbeat_interval_ms = {AGENT_HEARTBEAT_MS}
sweep_interval_ms = 50
cpu_budget_percent = 10
log_level = "debug"
[transport]
mode = "{transport}"
[control]
socket = "/run/guestagent-e2e/{transport}.sock"
[policy]
hold_time_ms = {HOLD_MS}
[steering]
enabled = true
# Steer to the best vCPU alone: vCPU 0 is reported at capacity 0, and vCPU 1 has some
# capacity however busy this shared machine is.
hysteresis = 0

[[rule]]
name = "e2e-latency-task"
comm = "{STEER_COMM}"
sched = "other"  # a latency task that asks for no boost: it only wants a good vCPU
steer = true
""")
    return path


def peer_config(vm: GuestVM) -> Path:
    path = vm.workdir / "host.toml"
    path.write_text(f"heartbeat_period = {PEER_PERIOD}\nlease_periods = {LEASE_PERIODS}\n"
                    f"max_rt_priority = {HOST_RT_CAP}\ncapacity_period = 0.2\n")
    return path


class World:
    """The guest, the agent in it and the peer beside it, on one transport."""

    def __init__(self, vm: GuestVM, transport: str) -> None:
        self.vm = vm
        self.transport = transport
        self.agent_config = agent_config(vm, transport)
        self.peer_config = peer_config(vm)
        self.peer_log = vm.workdir / f"peer-{transport}.log"
        self.peer: HostPeer | None = None
        self.agent: GuestAgent | None = None
        self.vcpus = vm.vcpu_threads()
        self.guest_pids: list[int] = []

    def start_peer(self) -> HostPeer:
        self.peer = HostPeer(self.vm, self.transport, self.peer_config, self.peer_log)
        return self.peer

    def start_agent(self) -> GuestAgent:
        self.agent = GuestAgent(self.vm, self.agent_config)
        return self.agent

    def ensure_running(self) -> None:
        """Both processes up and the link negotiated (a previous test may have killed one)."""
        if self.peer is None or self.peer.proc.poll() is not None:
            self.start_peer()
        if self.agent is None or not self.agent.running():
            self.start_agent()
        assert wait_for(self.link_up, 90, step=0.5), self.diagnostics()

    def link_up(self) -> bool:
        assert self.peer is not None
        doc = self.peer.status()
        return bool(doc and doc["link_state"] == "up" and doc["guest_state"] == "RUNNING")

    def spawn(self, argv: list[str]) -> int:
        pid = self.vm.spawn(argv)
        self.guest_pids.append(pid)
        return pid

    def rt_task_on_vcpu1(self) -> int:
        """A SCHED_FIFO task pinned to guest vCPU 1, sleeping until killed."""
        return self.spawn(["taskset", "-c", "1", "chrt", "-f", str(GUEST_RT_PRIORITY),
                           "sleep", "600"])

    def kill_guest_tasks(self) -> None:
        for pid in self.guest_pids:
            if self.vm.wait(pid, timeout=0).rc is None:
                self.vm.signal(pid, signal.SIGKILL)
                self.vm.wait(pid, timeout=20)
        self.guest_pids.clear()

    def vcpu_state(self, vcpu: int) -> SchedState:
        return sched_state(self.vcpus[vcpu])

    def wait_vcpu(self, vcpu: int, want: SchedState, timeout: float) -> bool:
        return bool(wait_for(lambda: self.vcpu_state(vcpu) == want, timeout, step=0.02))

    def stop(self) -> None:
        self.kill_guest_tasks()
        if self.agent is not None and self.agent.running():
            self.agent.stop()
        if self.peer is not None:
            self.peer.stop()

    def diagnostics(self) -> str:
        parts = [f"transport {self.transport}; vCPU threads {self.vcpus}: "
                 + ", ".join(f"{v}={sched_state(t)}" for v, t in self.vcpus.items())]
        if self.peer is not None:
            parts.append(f"peer (exit {self.peer.proc.poll()}) log:\n{self.peer.log_tail()}")
        if self.agent is not None:
            try:
                alive = self.agent.running()
                status = self.agent.cli("status") if alive else None
            except VMError as err:
                alive, status = False, f"guest not answering: {err}"
            parts.append(f"agent running {alive}; status {status}\n"
                         f"agent stderr:\n{self.agent.stderr[-3000:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module", params=["channel", "region"])
def world(request: pytest.FixtureRequest, guest: GuestVM) -> Iterator[World]:
    w = World(guest, request.param)
    try:
        w.ensure_running()
        yield w
    finally:
        w.stop()


@pytest.fixture
def e2e(world: World) -> Iterator[World]:
    """The module's world, running and with no boost left over from an earlier test."""
    world.ensure_running()
    for vcpu in world.vcpus:
        assert world.wait_vcpu(vcpu, OTHER, HOLD_MS / 1000 + 10), world.diagnostics()
    try:
        yield world
    finally:
        world.kill_guest_tasks()


# --- the tests ----------------------------------------------------------------------------


def test_agent_finds_its_transport_in_the_guest_kernel_and_negotiates(e2e: World) -> None:
    assert e2e.agent is not None and e2e.peer is not None
    status = e2e.agent.cli("status")
    assert status is not None, e2e.diagnostics()
    transport = status["transport"]
    assert transport["kind"] == e2e.transport and transport["link"] == "up", transport
    if e2e.transport == "channel":
        # Found through the udev symlink the guest kernel's port announcement created.
        assert transport["target"] == f"/dev/virtio-ports/{HINTS_PORT}"
        target = e2e.vm.run(["readlink", "-f", transport["target"]]).stdout.strip()
        assert target.startswith("/dev/vport"), target
    else:
        assert transport["target"] == "ivshmem"
        # The agent enabled the PCI 1af4:1110 device to map its BAR 2.
        # Shell builtins only: every fork is slow under TCG.
        enabled = e2e.vm.run(["sh", "-c", "for d in /sys/bus/pci/devices/*; do "
                              "read v < $d/vendor; read i < $d/device; "
                              "if [ $v:$i = 0x1af4:0x1110 ]; then read e < $d/enable; "
                              "echo $e; fi; done"]).stdout.split()
        assert enabled == ["1"], enabled
    assert transport["host_state"] == "running"
    assert status["nr_vcpus"] == 2 and status["pid"] == e2e.agent.pid

    peer = e2e.peer.status()
    assert peer is not None, e2e.diagnostics()
    assert peer["link"] == e2e.transport
    assert (peer["link_state"], peer["guest_state"]) == ("up", "RUNNING")
    assert peer["qemu_pid"] == e2e.vm.qemu_pid
    assert {v["vcpu"]: v["tid"] for v in peer["vcpus"]} == e2e.vcpus
    assert peer["generation"] >= 1


def test_fifo_task_on_vcpu1_boosts_its_qemu_thread_and_unboost_waits_the_hold(
        e2e: World) -> None:
    rt = e2e.rt_task_on_vcpu1()
    assert e2e.wait_vcpu(1, BOOSTED, 30), e2e.diagnostics()
    assert e2e.vcpu_state(0) == OTHER
    assert e2e.peer is not None
    peer = e2e.peer.status()
    assert peer is not None
    vcpu1 = peer["vcpus"][1]
    assert vcpu1["hint"]["request"] == "boost" and vcpu1["hint"]["class"] == "fifo"
    assert vcpu1["hint"]["rt_priority"] == GUEST_RT_PRIORITY
    assert {"boosted", "clamped"} <= set(vcpu1["applied"]), vcpu1
    # The guest learns what the host applied.
    assert e2e.agent is not None
    caps = wait_for(lambda: (e2e.agent.cli("capacity") or {}).get("vcpus"), 20, step=0.5)
    assert caps and {"boosted", "clamped"} <= set(caps[1]["applied"]), caps

    ending = time.monotonic()  # the task ends after this moment
    e2e.vm.signal(rt, signal.SIGKILL)
    assert e2e.wait_vcpu(1, OTHER, HOLD_MS / 1000 + 10), e2e.diagnostics()
    held = time.monotonic() - ending
    assert held >= HOLD_MS / 1000, f"unboosted {held:.3f} s after the task ended"


def test_host_capacity_reaches_the_guest_and_steers_an_opt_in_task(e2e: World) -> None:
    assert e2e.agent is not None and e2e.peer is not None
    task = e2e.vm.workdir / STEER_COMM
    if not task.exists():
        shutil.copy("/bin/sleep", task)  # its comm is the file's name
    pid = e2e.spawn([str(task), "600"])

    def guest_capacity() -> list[dict[str, Any]] | None:
        doc = e2e.agent.cli("capacity")  # type: ignore[union-attr]
        return doc["vcpus"] if doc and doc["known"] and doc["vcpus"] else None

    caps = wait_for(guest_capacity, 20, step=0.5)
    assert caps, e2e.diagnostics()
    assert [c["vcpu"] for c in caps] == [0, 1]
    assert caps[0]["capacity"] == 0  # --contend 0 on the peer
    assert caps[1]["capacity"] > 0, caps
    peer = e2e.peer.status()
    assert peer is not None and peer["vcpus"][0]["capacity"] == 0

    def allowed() -> str:
        out = e2e.vm.run(["grep", "Cpus_allowed_list", f"/proc/{pid}/status"]).stdout
        return out.split(":", 1)[1].strip() if ":" in out else ""

    assert wait_for(lambda: allowed() == "1", 20, step=0.3), (allowed(), e2e.diagnostics())
    # Steering moves affinity only; the task asked for no boost and got none.
    assert e2e.vcpu_state(0) == OTHER and e2e.vcpu_state(1) == OTHER


def test_sigkilled_agent_is_reverted_within_the_lease_and_a_new_one_boosts_again(
        e2e: World) -> None:
    assert e2e.agent is not None
    rt = e2e.rt_task_on_vcpu1()
    assert e2e.wait_vcpu(1, BOOSTED, 30), e2e.diagnostics()
    e2e.vm.signal(e2e.agent.pid, signal.SIGKILL)
    killed = time.monotonic()  # the agent's last heartbeat was before this moment
    assert e2e.wait_vcpu(1, OTHER, LEASE + 10), e2e.diagnostics()
    reverted = time.monotonic() - killed
    assert reverted <= LEASE + LEASE_SLACK, f"reverted {reverted:.2f} s after SIGKILL"
    assert e2e.agent.stop() == -signal.SIGKILL
    # The RT task still runs: only the lapsed lease explains the revert.
    assert e2e.vm.wait(rt, timeout=0).rc is None
    e2e.start_agent()  # a new epoch: the peer negotiates afresh and boosts again
    assert e2e.wait_vcpu(1, BOOSTED, 60), e2e.diagnostics()


def test_peer_restart_mid_run_agent_resynchronises_without_help(e2e: World) -> None:
    assert e2e.agent is not None and e2e.peer is not None
    agent_pid = e2e.agent.pid
    rt = e2e.rt_task_on_vcpu1()
    assert e2e.wait_vcpu(1, BOOSTED, 30), e2e.diagnostics()
    assert e2e.peer.stop() == 0
    assert e2e.vcpu_state(1) == OTHER  # restored by the peer on its way out
    e2e.start_peer()
    assert e2e.wait_vcpu(1, BOOSTED, 30), e2e.diagnostics()
    assert wait_for(e2e.link_up, 20, step=0.5), e2e.diagnostics()
    # The same agent process, never restarted or told anything.
    assert e2e.agent.running() and e2e.agent.pid == agent_pid
    status = e2e.agent.cli("status")
    assert status is not None and status["transport"]["link"] == "up", status
    assert e2e.vm.wait(rt, timeout=0).rc is None
