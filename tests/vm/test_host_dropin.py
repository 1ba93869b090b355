"""`guestagent-host serve` with a plain QEMU VM named by a drop-in file.

The guest (virtme-ng, TCG) runs the agent over the channel; the drop-in names the
VM's QMP socket and the chardev socket. The service serves it, boosts the vCPU
that runs an RT task and the emulator thread beside it (TCG), and SIGTERM
restores both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers.waiting import wait_for

from testbed.vm import GuestVM

pytestmark = [pytest.mark.vm, pytest.mark.root]


def policy(tid: int) -> int:
    return os.sched_getscheduler(tid) & 0xFF  # without SCHED_RESET_ON_FORK


@pytest.fixture
def served(guest: GuestVM, tmp_path) -> Iterator[dict]:
    dropins = tmp_path / "vms.d"
    dropins.mkdir()
    (dropins / "plain1.toml").write_text(
        f'qmp = "{guest.peer_qmp_sock}"\nchannel = "{guest.hints_sock}"\n')
    cfg = tmp_path / "host.toml"
    cfg.write_text(f"""\
heartbeat_period = 0.5
max_rt_priority = 10
[host]
libvirt_status_dir = "{tmp_path / 'no-libvirt'}"
dropin_dir = "{dropins}"
max_boosted = 2
max_boosted_per_vm = 1
boost_budget = 5.0
rescan_period = 1.0
""")
    agent_cfg = guest.workdir / "agent-dropin.toml"
    agent_cfg.write_text('[agent]\nheartbeat_interval_ms = 250\n[transport]\nmode = "channel"\n'
                         '[control]\nsocket = "/run/guestagent-dropin.sock"\n')
    status = str(tmp_path / "status.sock")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        svc = subprocess.Popen([sys.executable, "-m", "guestagent.host.cli", "serve", "--config",
                                str(cfg), "--status-socket", status, "--state-dir",
                                str(tmp_path / "state"), "-v"], stdout=out, stderr=out)
    agent = guest.spawn([sys.executable, "-m", "guestagent", "run", "--config", str(agent_cfg)])
    try:
        yield {"svc": svc, "status": status, "log": log}
    finally:
        guest.signal(agent, signal.SIGTERM)
        guest.wait(agent, timeout=30)
        if svc.poll() is None:
            svc.send_signal(signal.SIGTERM)
        svc.wait(60)


def _doc(status: str):
    proc = subprocess.run([sys.executable, "-m", "guestagent.host.cli", "status", "--json",
                           "--status-socket", status], capture_output=True, text=True,
                          timeout=30)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def test_dropin_vm_is_served_and_restored(guest: GuestVM, served):
    vcpus = guest.vcpu_threads()
    qemu = guest.qemu_pid

    def linked():
        doc = _doc(served["status"])
        vms = (doc or {}).get("vms", [])
        return vms and vms[0]["name"] == "dropin:plain1" and vms[0].get("link_state") == "up"

    assert wait_for(linked, 180), served["log"].read_text()
    task = guest.spawn(["taskset", "-c", "1", "chrt", "-f", "50", "sleep", "600"])
    try:
        assert wait_for(lambda: policy(vcpus[1]) == os.SCHED_FIFO, 90), \
            served["log"].read_text()
        assert wait_for(lambda: policy(qemu) == os.SCHED_FIFO, 30), served["log"].read_text()
        assert policy(vcpus[0]) == os.SCHED_OTHER
    finally:
        guest.signal(task, signal.SIGKILL)
    served["svc"].send_signal(signal.SIGTERM)
    assert served["svc"].wait(60) == 0
    assert policy(vcpus[1]) == os.SCHED_OTHER and policy(qemu) == os.SCHED_OTHER
