"""A vCPU hot-plugged into a real QEMU is followed without reverting the VM's boosts.

Real QEMU (TCG, `-smp 1,maxcpus=2`, no guest kernel: the vCPU threads are what
matter here) is a drop-in VM of `guestagent-host serve`, served over a region
file in which this test plays the guest with the real RegionGuestLink. vCPU 0
and the main loop are boosted; a CPU is then plugged with QMP device_add, as an
operator would: the service takes the new `CPU 1/TCG` thread on in place (vCPU 0
is never seen unboosted meanwhile) and boosts it too; SIGTERM restores all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers.hostregion import zeroed_region
from helpers.standin import policy, pump, ticking
from helpers.waiting import wait_for

from guestagent.protocol.model import PeerState, Request, SchedClass, VcpuHint
from guestagent.transport import RegionGuestLink
from testbed.libvirt import vcpu_tids

pytestmark = [pytest.mark.vm, pytest.mark.root]

QEMU = "qemu-system-x86_64"
PERIOD = 0.5


def qmp(path: str, command: str, **arguments) -> dict:
    """One QMP command on a fresh connection (QEMU serves one client at a time: retried)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s, s.makefile("rwb") as f:
                s.connect(path)
                f.readline()
                for cmd in ({"execute": "qmp_capabilities"},
                            {"execute": command, **({"arguments": arguments} if arguments
                                                    else {})}):
                    f.write(json.dumps(cmd).encode() + b"\n")
                    f.flush()
                    while True:
                        reply = json.loads(f.readline())
                        if "event" not in reply:
                            break
                return reply
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_hot_plugged_vcpu_of_a_real_qemu_is_followed_in_place(tmp_path):
    if shutil.which(QEMU) is None:
        pytest.skip(f"needs {QEMU} (qemu-system-x86)")
    qmp_path, region = str(tmp_path / "qmp.sock"), str(tmp_path / "region")
    zeroed_region(region)
    qemu = subprocess.Popen([QEMU, "-name", "hotplug,debug-threads=on", "-machine", "q35",
                             "-accel", "tcg", "-smp", "1,maxcpus=2", "-m", "64", "-nodefaults",
                             "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    svc = None
    try:
        assert wait_for(lambda: os.path.exists(qmp_path) and vcpu_tids(qemu.pid), 60)
        dropins = tmp_path / "vms.d"
        dropins.mkdir()
        (dropins / "hp.toml").write_text(f'qmp = "{qmp_path}"\nregion = "{region}"\n'
                                         'accel = "tcg"\n')
        cfg = tmp_path / "host.toml"
        cfg.write_text(f"""\
heartbeat_period = {PERIOD}
lease_periods = 2.0
max_rt_priority = 10
min_change_interval = 0
[host]
libvirt_status_dir = "{tmp_path / 'no-libvirt'}"
dropin_dir = "{dropins}"
max_boosted_per_cpu = 2
max_boosted = 4
max_boosted_per_vm = 2
boost_budget = 600.0
rescan_period = 0.5
""")
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            svc = subprocess.Popen([sys.executable, "-m", "guestagent.host.cli", "serve",
                                    "--config", str(cfg), "--state-dir", str(tmp_path / "state"),
                                    "--status-socket", str(tmp_path / "status.sock"), "-v"],
                                   stdout=out, stderr=out)
        guest = RegionGuestLink(region, 2, heartbeat_period=PERIOD / 2)
        guest.set_state(PeerState.RUNNING, time.monotonic())
        guest.publish((VcpuHint(0, Request.BOOST, SchedClass.FIFO, rt_priority=99),
                       VcpuHint(1, Request.BOOST, SchedClass.FIFO, rt_priority=99)), 1,
                      time.monotonic())
        v0 = vcpu_tids(qemu.pid)[0]
        assert pump(guest, 60, lambda: policy(v0) == (os.SCHED_FIFO, 10)
                    and policy(qemu.pid)[0] == os.SCHED_FIFO), log.read_text()
        with ticking(guest):
            hp = qmp(qmp_path, "query-hotpluggable-cpus")["return"]
            free = next(c for c in hp if "qom-path" not in c)
            assert "return" in qmp(qmp_path, "device_add", driver=free["type"], id="cpu1",
                                   **free["props"])
            seen = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                seen.append(policy(v0))
                v1 = vcpu_tids(qemu.pid).get(1)
                if v1 is not None and policy(v1) == (os.SCHED_FIFO, 10):
                    break
                time.sleep(0.002)
            text = log.read_text()
            assert v1 is not None and policy(v1) == (os.SCHED_FIFO, 10), text
            assert set(seen) == {(os.SCHED_FIFO, 10)}, (set(seen), text)  # never reverted
            assert "following hot-plugged vCPU 1" in text and "restored" not in text, text
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(60) == 0
        assert policy(v0)[0] == policy(v1)[0] == policy(qemu.pid)[0] == os.SCHED_OTHER
        guest.close()
    finally:
        if svc is not None and svc.poll() is None:
            svc.kill()
            svc.wait(30)
        qemu.kill()
        qemu.wait(30)
