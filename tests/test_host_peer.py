"""The peer loop over real vCPU-like threads, and the guestagent-host command line.

The guest's side arrives through ScriptedLink: it stands in for a transport
link (guestagent.transport) so each test can say exactly what the guest
publishes and when its heartbeat last advanced; the transport itself is
tested with the protocol, and the end-to-end tests run both for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.scripted import LIMITS, ScriptedLink, fifo

from guestagent.host.applier import ThreadApplier, read_settings
from guestagent.host.config import HostLimits
from guestagent.host.discovery import discover
from guestagent.host.peer import HostPeer
from guestagent.host.status import format_status, status_document
from guestagent.protocol.model import (
    AppliedFlag,
    PeerState,
    Request,
    SchedClass,
    VcpuHint,
)

pytestmark = pytest.mark.root

@pytest.fixture
def peer(standin):
    pid, threads = discover(standin.qmp)
    logs: list[str] = []
    applier = ThreadApplier(pid, threads, dry_run=False, log=logs.append)
    p = HostPeer(applier, LIMITS, frozenset({0, 1}), ScriptedLink(), logs.append)
    yield p
    applier.restore_all()


def kernel(tid):
    return (os.sched_getscheduler(tid) & 0xFF, os.sched_getparam(tid).sched_priority,
            os.getpriority(os.PRIO_PROCESS, tid), os.sched_getaffinity(tid))



def test_boost_clamp_and_unboost_reach_the_kernel(peer, standin):
    t0, t1 = standin.tids[0], standin.tids[1]
    before = {t: kernel(t) for t in (t0, t1)}
    peer.link.guest(fifo(0, 99), VcpuHint(1, Request.UNBOOST, nice=12), now=10.0)
    peer.step(10.0)
    assert kernel(t0)[:2] == (os.SCHED_FIFO, 40)  # FIFO 99 clamped to the cap
    assert kernel(t1)[:3] == (os.SCHED_OTHER, 0, 12)
    assert peer.plan.vcpus[0].applied == AppliedFlag.BOOSTED | AppliedFlag.CLAMPED
    caps = {c.vcpu: c for c in peer.link.published[-1]}
    assert caps[0].applied == AppliedFlag.BOOSTED | AppliedFlag.CLAMPED
    assert caps[1].applied == AppliedFlag.THROTTLED and caps[1].acked_generation == 1
    # A new table is acknowledged at once, without waiting for the capacity period.
    peer.link.guest(fifo(0, 20), VcpuHint(1, Request.UNBOOST, nice=12), now=10.01,
                    generation=5)
    peer.step(10.01)
    assert peer.link.published[-1][0].acked_generation == 5
    assert peer.link.published[-1][0].applied == AppliedFlag.BOOSTED
    # Neutral hints put the threads back.
    peer.link.guest(VcpuHint(0), VcpuHint(1), now=10.1, generation=2)
    peer.step(10.1)
    assert {t: kernel(t) for t in (t0, t1)} == before


def test_boost_cap_denies_the_lower_priority_vcpu(peer, standin):
    peer.link.guest(fifo(0, 10), fifo(1, 20), now=5.0)
    peer.step(5.0)
    assert kernel(standin.tids[1])[:2] == (os.SCHED_FIFO, 20)
    assert kernel(standin.tids[0])[0] == os.SCHED_OTHER
    assert peer.plan.vcpus[0].applied == AppliedFlag.DENIED


def test_lease_expiry_reverts_within_two_heartbeats(peer, standin):
    t0 = standin.tids[0]
    before = kernel(t0)
    peer.link.guest(fifo(0, 30), now=20.0)
    deadline = peer.step(20.0)
    assert kernel(t0)[0] == os.SCHED_FIFO
    # The loop is told to wake by the lease end, within two heartbeat periods.
    assert deadline <= 20.0 + 2 * LIMITS.heartbeat_period
    peer.step(20.0 + LIMITS.lease)  # the guest went quiet: no heartbeat since 20.0
    assert kernel(t0) == before
    assert peer.plan.lease.value == "expired"


def test_stopping_guest_reverts_at_once(peer, standin):
    peer.link.guest(fifo(0, 30), now=1.0)
    peer.step(1.0)
    peer.link.guest(fifo(0, 30), now=1.05, state=PeerState.STOPPING)
    peer.step(1.05)
    assert kernel(standin.tids[0])[0] == os.SCHED_OTHER


def test_same_group_vcpus_pinned_apart(peer, standin):
    peer.link.guest(fifo(0, 10, group=4), VcpuHint(1, group=4), now=3.0)
    peer.step(3.0)
    a, b = kernel(standin.tids[0])[3], kernel(standin.tids[1])[3]
    assert len(a) == len(b) == 1 and a != b and a | b == {0, 1}
    assert peer.plan.vcpus[1].applied == AppliedFlag.PINNED


def test_hostile_guest_never_crashes_the_peer(peer, standin):
    garbage = [VcpuHint(9, Request.BOOST, SchedClass.FIFO, rt_priority=99),
               VcpuHint(-3), fifo(0, 99), fifo(0, 1), "not a hint", None]
    peer.link.guest(*garbage, now=7.0)
    peer.step(7.0)
    assert peer.counters["rejected_hints"] == 3
    assert kernel(standin.tids[0])[:2] == (os.SCHED_FIFO, 40)
    # A flood: thousands of alternating hint sets in a row, at most one change per interval.
    limited = HostLimits(**{**LIMITS.__dict__, "min_change_interval": 1.0})
    peer.limits = limited
    for i in range(2000):
        peer.link.guest(fifo(0, 5 + i % 30), now=7.0 + i * 1e-4)
        peer.step(7.0 + i * 1e-4)
    assert kernel(standin.tids[0])[1] in (40, 5)
    # A link that raises is counted and logged, the peer goes on.
    peer.link.fail = True
    peer.step(8.0)
    assert peer.counters["link_errors"] >= 1


def test_status_document_shows_hint_policy_and_capacity(peer, standin):
    peer.link.guest(fifo(0, 30), now=1.0)
    peer.step(1.0)
    doc = status_document(peer.snapshot(1.1))
    v0 = doc["vcpus"][0]
    assert v0["hint"]["request"] == "boost" and v0["applied"] == ["boosted"]
    assert v0["policy"] == "fifo 30" and v0["tid"] == standin.tids[0]
    assert doc["lease"] == "held" and 0 < doc["lease_remaining"] <= LIMITS.lease
    table = format_status(json.loads(json.dumps(doc)))
    assert "boost fifo 30" in table and "lease held" in table


def run_host(*args):
    return subprocess.run([sys.executable, "-m", "guestagent.host.cli", *args],
                          capture_output=True, text=True, timeout=30)


def test_cli_errors_are_one_line(tmp_path):
    proc = run_host("run", "--qmp", str(tmp_path / "none"), "--status-socket",
                    str(tmp_path / "s"), "--channel", str(tmp_path / "c"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot talk QMP" in proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("max_boosted = -1\n")
    proc = run_host("run", "--config", str(bad), "--pid", "1", "--channel", str(tmp_path / "c"))
    assert proc.returncode == 1 and f"{bad}:1: max_boosted" in proc.stderr
    proc = run_host("status", "--status-socket", str(tmp_path / "s"))
    assert proc.returncode == 1 and "no guestagent-host running" in proc.stderr
    proc = run_host("run", "--contend", "x=2")
    assert proc.returncode == 2 and "VCPU=CAPACITY" in proc.stderr


def test_cli_run_status_and_sigterm(standin, tmp_path):
    sock = str(tmp_path / "status.sock")
    peer = subprocess.Popen(
        [sys.executable, "-m", "guestagent.host.cli", "run", "--qmp", standin.qmp,
         "--status-socket", sock, "--contend", "1=100", "--state-dir", str(tmp_path / "state"),
         "--region", str(tmp_path / "region")],
        stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        time.sleep(1.2)  # one capacity period, so a capacity is published
        proc = run_host("status", "--json", "--status-socket", sock)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["qemu_pid"] == standin.pid and doc["lease"] == "none"
        assert [v["tid"] for v in doc["vcpus"]] == [standin.tids[0], standin.tids[1]]
        assert doc["vcpus"][1]["capacity"] == 100
        table = run_host("status", "--status-socket", sock)
        assert "CAPACITY" in table.stdout and table.returncode == 0
        peer.send_signal(signal.SIGTERM)
        assert peer.wait(10) == 0
        assert "SIGTERM" in peer.stderr.read()
        assert not os.path.exists(sock)
        assert all(read_settings(t).policy == os.SCHED_OTHER for t in standin.tids.values())
    finally:
        peer.kill()
        peer.wait()


PEER_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from helpers.scripted import LIMITS, ScriptedLink, fifo
from guestagent.host.applier import ThreadApplier
from guestagent.host.discovery import discover
from guestagent.host.peer import HostPeer
from guestagent.protocol.model import PeerState, VcpuHint

class Renewing(ScriptedLink):
    # A guest that keeps its heartbeat going: the boost holds until the peer is stopped.
    def view(self):
        self.guest(fifo(0, 30, group=1), VcpuHint(1, group=1), now=time.monotonic())
        return self.state
    def tick(self, now):
        return now + 0.05

pid, threads = discover({qmp!r})
applier = ThreadApplier(pid, threads, dry_run={dry!r}, log=print)
peer = HostPeer(applier, LIMITS, frozenset({{0, 1}}), Renewing(), print)
print("running", flush=True)
sys.exit(peer.run(None))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_peer_process_restores_threads_on_signal(standin, sig):
    tids = standin.tids
    before = {t: kernel(t) for t in tids.values()}
    script = PEER_SCRIPT.format(tests=os.path.dirname(__file__), qmp=standin.qmp, dry=False)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        for _ in range(100):
            if kernel(tids[0])[0] == os.SCHED_FIFO:
                break
            time.sleep(0.02)
        assert kernel(tids[0])[:2] == (os.SCHED_FIFO, 30)
        assert kernel(tids[0])[3] != kernel(tids[1])[3]  # pinned apart
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        assert {t: kernel(t) for t in tids.values()} == before
    finally:
        proc.kill()
        proc.wait()


def test_dry_run_peer_changes_nothing(standin):
    before = {t: kernel(t) for t in standin.tids.values()}
    script = PEER_SCRIPT.format(tests=os.path.dirname(__file__), qmp=standin.qmp, dry=True)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        # the lease, then per vCPU what it would set and what it set (the unboosted first)
        lines = [proc.stdout.readline() for _ in range(5)]
        assert any("dry run: vCPU 0" in line and "would set fifo 30" in line for line in lines)
        assert {t: kernel(t) for t in standin.tids.values()} == before
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
