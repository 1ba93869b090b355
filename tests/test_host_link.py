"""guestagent-host over the real channel link, against a stand-in QEMU's threads.

The test plays the guest with the real ChannelGuestLink connected to the
peer's listening socket (QEMU would relay the virtio-serial port there; the
end-to-end tests run QEMU for real).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.standin import policy, pump, seconds_until_reverted, ticking

from guestagent.protocol.model import AppliedFlag, PeerState, Request, SchedClass, VcpuHint
from guestagent.transport import ChannelGuestLink

pytestmark = pytest.mark.root

PERIOD = 0.2  # a short heartbeat period keeps the lease test fast


def test_guest_hints_over_channel_boost_then_revert_when_guest_goes_quiet(standin, tmp_path):
    chan, status = str(tmp_path / "hints.sock"), str(tmp_path / "status.sock")
    cfg = tmp_path / "host.toml"
    cfg.write_text(f"heartbeat_period = {PERIOD}\nmax_rt_priority = 40\n"
                   "min_change_interval = 0\ncapacity_period = 0.2\n")
    peer = subprocess.Popen(
        [sys.executable, "-m", "guestagent.host.cli", "run", "--qmp", standin.qmp,
         "--channel", chan, "--listen", "--config", str(cfg), "--status-socket", status,
         "--state-dir", str(tmp_path / "state")],
        stderr=subprocess.PIPE, text=True)
    t0 = standin.tids[0]
    try:
        for _ in range(200):
            if os.path.exists(chan):
                break
            time.sleep(0.02)
        # A guest claiming a third vCPU the VM does not have: that hint must be rejected.
        guest = ChannelGuestLink(chan, 3, heartbeat_period=PERIOD / 2)
        guest.set_state(PeerState.RUNNING, time.monotonic())
        hints = (VcpuHint(0, Request.BOOST, SchedClass.FIFO, rt_priority=99), VcpuHint(1),
                 VcpuHint(2, Request.BOOST, SchedClass.FIFO, rt_priority=99))
        guest.publish(hints, 1, time.monotonic())
        assert pump(guest, 5.0, lambda: policy(t0) == (os.SCHED_FIFO, 40)), peer.stderr
        # The host's answer reaches the guest: acknowledged, boosted but clamped.
        assert pump(guest, 3.0, lambda: guest.view().acked_generation == 1
                    and guest.view().capacity is not None)
        cap0 = guest.view().capacity[0]
        assert cap0.applied == AppliedFlag.BOOSTED | AppliedFlag.CLAMPED
        with ticking(guest):  # a status query can outlast the lease on a loaded machine
            proc = subprocess.run([sys.executable, "-m", "guestagent.host.cli", "status",
                                   "--json", "--status-socket", status], capture_output=True,
                                  text=True, timeout=30)
        doc = json.loads(proc.stdout)
        assert doc["link"] == "channel" and doc["lease"] == "held"
        assert doc["vcpus"][0]["policy"] == "fifo 40" and doc["counters"]["rejected_hints"] > 0
        # The guest goes quiet (no more heartbeats): reverted within two periods.
        assert seconds_until_reverted(t0) <= 2 * PERIOD + 0.15  # plus scheduling slack
        guest.close()
        peer.send_signal(signal.SIGTERM)
        assert peer.wait(10) == 0
    finally:
        peer.kill()
        peer.wait()
