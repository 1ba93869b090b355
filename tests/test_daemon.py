"""`guestagent run` for real: a subprocess publishing hints for real FIFO threads
to the reference host peer, which applies them to a stand-in QEMU's vCPU threads.

The stand-in (tests/test_host_standin.py) is a process whose threads are named
`CPU n/KVM` and which answers QMP; the end-to-end tests use a real QEMU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_host_standin import Standin

from guestagent.control import call
from guestagent.errors import GuestagentError

PERIOD = 0.2  # heartbeat period on both sides: short, so leases and tests are quick
HOLD_MS = 400


def wait_for(predicate, timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def policy(tid: int) -> tuple[int, int]:
    return os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority


class RtThread:
    """A real SCHED_FIFO thread pinned to one CPU, sleeping until stopped."""

    def __init__(self, cpu: int, prio: int, name: str = "rt-probe") -> None:
        self.stop_event, ready = threading.Event(), threading.Event()
        self.error: BaseException | None = None

        def body() -> None:
            try:
                tid = threading.get_native_id()
                with open(f"/proc/self/task/{tid}/comm", "w") as f:
                    f.write(name)
                os.sched_setaffinity(0, {cpu})
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
            except BaseException as err:  # reported by the test, not lost in the thread
                self.error = err
            finally:
                ready.set()
            self.stop_event.wait()

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
        ready.wait(5)
        if self.error:
            raise self.error

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)


class Peer:
    """The reference host peer as a subprocess listening on the channel socket."""

    def __init__(self, standin: Standin, chan: str, tmp) -> None:
        cfg = tmp / "host.toml"
        cfg.write_text(f"heartbeat_period = {PERIOD}\nmax_rt_priority = 40\n"
                       "min_change_interval = 0\ncapacity_period = 0.2\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "guestagent.host.cli", "run", "--qmp", standin.qmp,
             "--channel", chan, "--listen", "--config", str(cfg),
             "--status-socket", str(tmp / "peer-status.sock")],
            stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: os.path.exists(chan), 10), "host peer did not listen"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


@pytest.fixture
def standin(tmp_path):
    s = Standin(str(tmp_path / "qmp.sock"), 2)
    yield s
    s.stop()


def agent_config(tmp_path, chan: str, extra: str = "") -> str:
    path = tmp_path / "guestagent.toml"
    path.write_text(f"""
[agent]
heartbeat_interval_ms = {int(PERIOD * 1000 / 2)}
sweep_interval_ms = 20
cpu_budget_percent = 5
[transport]
mode = "channel"
port_name = "{chan}"
[control]
socket = "{tmp_path / 'control.sock'}"
[policy]
hold_time_ms = {HOLD_MS}
min_change_interval_ms = 0
# Guest and host share one kernel here: the agent would see the stand-in's
# vCPU threads once the peer boosts them, and boost their vCPUs in turn. They
# float over both CPUs; the test's RT threads are pinned.
floating_rt = "ignore"
{extra}""")
    return str(path)


class AgentProcess:
    def __init__(self, config: str, socket_path: str) -> None:
        self.socket = socket_path
        self.proc = subprocess.Popen([sys.executable, "-m", "guestagent", "run",
                                      "--config", config], stderr=subprocess.PIPE, text=True)
        assert wait_for(self.answers, 20), self.fail_text()

    def answers(self) -> bool:
        try:
            call(self.socket, "ping", timeout=1)
            return True
        except GuestagentError:
            return self.proc.poll() is not None

    def ask(self, cmd: str) -> dict:
        return call(self.socket, cmd, timeout=5)

    def link(self) -> str:
        return self.ask("status")["transport"]["link"]

    def fail_text(self) -> str:
        if self.proc.poll() is None:
            return "agent not answering"
        return f"agent exited {self.proc.returncode}: {self.proc.stderr.read()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def world(tmp_path, standin):
    chan = str(tmp_path / "hints.sock")
    peer = Peer(standin, chan, tmp_path)
    config = agent_config(tmp_path, chan)
    agent = AgentProcess(config, str(tmp_path / "control.sock"))
    yield agent, peer, standin, config
    agent.kill()
    if peer.proc.poll() is None:
        peer.proc.kill()
        peer.proc.wait()


def test_fifo_thread_boosts_the_vcpu_thread_and_unboosts_after_hold(world):
    agent, peer, standin, _ = world
    vcpu1 = standin.tids[1]
    assert wait_for(lambda: agent.link() == "up", 10), agent.ask("status")
    rt = RtThread(cpu=1, prio=30)
    try:
        assert wait_for(lambda: policy(vcpu1) == (os.SCHED_FIFO, 30), 5), agent.ask("hints")
        hints = agent.ask("hints")["vcpus"]
        assert hints[1]["request"] == "boost" and hints[1]["rt_priority"] == 30
        assert any("rt-probe" in r for r in hints[1]["reasons"])
        assert "pinned_critical" in hints[1]["flags"]
    finally:
        rt.stop()
    ended = time.monotonic()
    assert wait_for(lambda: policy(vcpu1) == (os.SCHED_OTHER, 0), 5), json.dumps(agent.ask("hints"))
    assert time.monotonic() - ended >= HOLD_MS / 1000 * 0.9, "unboost must wait the hold time"
    capacity = agent.ask("capacity")
    assert capacity["known"] and len(capacity["vcpus"]) == 2


def test_sighup_with_a_broken_config_keeps_the_old_one(world, tmp_path):
    agent, _, _, config = world
    good = open(config).read()
    with open(config, "w") as f:
        f.write("[agent]\nsweep_interval_ms = 'often'\n")
    agent.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert agent.proc.poll() is None
    assert agent.ask("status")["errors"].get("config") == 1
    with open(config, "w") as f:
        f.write(good.replace(f"hold_time_ms = {HOLD_MS}", "hold_time_ms = 50"))
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: agent.ask("status")["errors"].get("config") == 1, 2)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0
    err = agent.proc.stderr.read()
    assert "config not reloaded" in err and "must be an integer" in err
    assert "config reloaded" in err
    assert "Traceback" not in err


def test_sigterm_publishes_neutral_hints_and_the_host_reverts_at_once(world):
    agent, peer, standin, _ = world
    vcpu1 = standin.tids[1]
    assert wait_for(lambda: agent.link() == "up", 10)
    rt = RtThread(cpu=1, prio=25)
    try:
        assert wait_for(lambda: policy(vcpu1) == (os.SCHED_FIFO, 25), 5)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(10) == 0
        stopped = time.monotonic()
        # The RT thread still runs: only the agent's neutral hints explain a revert.
        assert wait_for(lambda: policy(vcpu1) == (os.SCHED_OTHER, 0), 3)
        assert time.monotonic() - stopped < 2 * PERIOD
    finally:
        rt.stop()
    assert "Traceback" not in agent.proc.stderr.read()


def test_host_peer_going_away_and_returning(world, tmp_path):
    agent, peer, standin, _ = world
    vcpu0 = standin.tids[0]
    assert wait_for(lambda: agent.link() == "up", 10)
    assert peer.stop() == 0
    assert wait_for(lambda: agent.link() != "up", 5)
    rt = RtThread(cpu=0, prio=20)
    try:
        assert policy(vcpu0) == (os.SCHED_OTHER, 0)
        again = Peer(standin, str(tmp_path / "hints.sock"), tmp_path)
        try:
            assert wait_for(lambda: agent.link() == "up", 10), agent.ask("status")
            assert wait_for(lambda: policy(vcpu0) == (os.SCHED_FIFO, 20), 5)
        finally:
            again.stop()
    finally:
        rt.stop()
    status = agent.ask("status")
    assert status["generation"] >= 2 and agent.proc.poll() is None


def test_status_and_hints_cli_talk_to_the_daemon(world):
    agent, _, _, config = world
    run = [sys.executable, "-m", "guestagent"]
    out = subprocess.run(run + ["status", "--config", config], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "channel" in out.stdout, out.stderr
    out = subprocess.run(run + ["hints", "--json", "--config", config], capture_output=True,
                         text=True, timeout=30)
    doc = json.loads(out.stdout)
    assert doc["schema_version"] == 1 and len(doc["vcpus"]) == 2
    out = subprocess.run(run + ["watch", "--count", "2", "--interval", "0.1", "--config",
                                config], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.count("\x1b[H\x1b[J") == 2
