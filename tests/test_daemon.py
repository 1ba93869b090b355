"""`guestagent run` for real: a subprocess publishing hints for real FIFO threads
to the reference host peer, which applies them to a stand-in QEMU's vCPU threads.

The stand-in (tests/helpers/standin.py) is a process whose threads are named
`CPU n/KVM` and which answers QMP; the end-to-end tests use a real QEMU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers.agentproc import HOLD_MS, PERIOD, AgentProcess, Peer, RtThread, agent_config
from helpers.standin import policy
from helpers.waiting import wait_for

pytestmark = pytest.mark.root


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
        ended = time.monotonic()  # the thread ends after this moment (not when join returns)
        rt.stop()
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
    assert wait_for(lambda: agent.logged("config not reloaded"), 20), agent.log()
    assert agent.proc.poll() is None
    assert agent.ask("status")["errors"].get("config") == 1
    with open(config, "w") as f:
        f.write(good.replace(f"hold_time_ms = {HOLD_MS}", "hold_time_ms = 50"))
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: agent.logged("config reloaded from"), 20), agent.log()
    assert agent.ask("status")["errors"].get("config") == 1, "a good reload is not an error"
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0
    err = agent.log()
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
    assert "Traceback" not in agent.log()


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
    # Into a pipe, watch prints one plain block per refresh, each under a timed title.
    titles = [ln for ln in out.stdout.splitlines() if re.match(r"\d\d:\d\d:\d\d  ", ln)]
    assert out.returncode == 0 and "\x1b" not in out.stdout and len(titles) == 2, out.stdout
