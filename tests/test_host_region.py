"""guestagent-host over the real shared-region link, against a stand-in QEMU's threads.

The test plays the guest with the real RegionGuestLink on a region file under a
tmp dir, as QEMU's memory-backend-file would back the ivshmem device; the peer
runs as a subprocess, as in production. Mirrors test_host_link.py (the channel).
"""

from __future__ import annotations

import os
import time

import pytest
from helpers.hostregion import PERIOD, start_peer, status_of, stop, zeroed_region
from helpers.standin import policy, pump, seconds_until_reverted, ticking
from helpers.waiting import wait_for

from guestagent.protocol.model import AppliedFlag, PeerState, Request, SchedClass, VcpuHint
from guestagent.transport import RegionGuestLink

pytestmark = pytest.mark.root

def test_region_appears_late_then_boost_ack_capacity_and_revert(standin, tmp_path):
    region = str(tmp_path / "guestagent-vm1")
    peer, status = start_peer(standin, tmp_path, region)  # before QEMU made the file
    t0, t1 = standin.tids[0], standin.tids[1]
    try:
        doc = status_of(status)
        assert doc["link"] == "region" and doc["link_state"] == "down"
        assert "No such file" in doc["link_reason"]
        zeroed_region(region)  # QEMU starts: a zeroed file the guest has not formatted
        assert wait_for(lambda: "not formatted" in status_of(status)["link_reason"], 8.0)
        assert peer.poll() is None and policy(t0) == (os.SCHED_OTHER, 0)

        # A guest claiming a third vCPU the VM does not have: that hint must be rejected.
        guest = RegionGuestLink(region, 3, heartbeat_period=PERIOD / 2)
        guest.set_state(PeerState.RUNNING, time.monotonic())
        hints = (VcpuHint(0, Request.BOOST, SchedClass.FIFO, rt_priority=99), VcpuHint(1),
                 VcpuHint(2, Request.BOOST, SchedClass.FIFO, rt_priority=99))
        guest.publish(hints, 1, time.monotonic())
        assert pump(guest, 5.0, lambda: policy(t0) == (os.SCHED_FIFO, 40))  # capped at 40
        assert policy(t1) == (os.SCHED_OTHER, 0)
        # The host's answer reaches the guest: acknowledged, boosted but clamped.
        assert pump(guest, 3.0, lambda: guest.view().acked_generation == 1
                    and guest.view().capacity is not None)
        view = guest.view()
        assert view.link == "up" and view.host_state == PeerState.RUNNING
        caps = view.capacity
        assert [c.vcpu for c in caps] == [0, 1, 2]
        assert caps[0].applied == AppliedFlag.BOOSTED | AppliedFlag.CLAMPED
        assert caps[0].acked_generation == 1 and 0 <= caps[0].capacity <= 1024
        assert caps[1].applied == AppliedFlag(0)
        with ticking(guest):
            doc = status_of(status)
        assert doc["link_state"] == "up" and doc["lease"] == "held"
        assert doc["vcpus"][0]["policy"] == "fifo 40" and doc["counters"]["rejected_hints"] > 0

        # The guest goes quiet (no more heartbeats): reverted within two periods.
        assert seconds_until_reverted(t0) <= 2 * PERIOD + 0.15  # plus scheduling slack
        guest.close()
        rc, err = stop(peer)
        assert rc == 0, err
    finally:
        peer.kill()
        peer.wait()


def test_guest_reformats_after_restart_and_sigterm_restores(standin, tmp_path):
    region = str(tmp_path / "guestagent-vm1")
    zeroed_region(region)
    peer, status = start_peer(standin, tmp_path, region)
    t0, t1 = standin.tids[0], standin.tids[1]
    try:
        old = RegionGuestLink(region, 2, heartbeat_period=PERIOD / 2)
        old.set_state(PeerState.RUNNING, time.monotonic())
        old.publish((VcpuHint(0, Request.BOOST, SchedClass.RR, rt_priority=10), VcpuHint(1)),
                    5, time.monotonic())
        assert pump(old, 5.0, lambda: policy(t0) == (os.SCHED_RR, 10)
                    and old.view().acked_generation == 5)
        assert status_of(status)["generation"] == 5
        old.close()  # died without STOPPING; a guest of another shape restarts on the region

        new = RegionGuestLink(region, 3, heartbeat_period=PERIOD / 2)  # reformats it
        new.set_state(PeerState.RUNNING, time.monotonic())
        new.publish((VcpuHint(0), VcpuHint(1, Request.BOOST, SchedClass.FIFO, rt_priority=20),
                     VcpuHint(2)), 1, time.monotonic())
        # The host verdicts the new epoch, drops the old guest's boost and acts on the new
        # table: the new guest's generation 1 is acknowledged although 5 was before.
        assert pump(new, 5.0, lambda: policy(t1) == (os.SCHED_FIFO, 20)
                    and policy(t0) == (os.SCHED_OTHER, 0)
                    and new.view().acked_generation == 1)
        assert new.view().link == "up"
        assert pump(new, 3.0, lambda: new.view().capacity is not None
                    and new.view().capacity[1].applied == AppliedFlag.BOOSTED)

        # Stopped while the guest keeps the boost held: every thread goes back.
        with ticking(new):
            time.sleep(3 * PERIOD)  # longer than the lease: only heartbeats keep it
            assert status_of(status)["lease"] == "held"
            assert policy(t1) == (os.SCHED_FIFO, 20)
            rc, err = stop(peer)
        assert rc == 0, err
        assert policy(t0) == policy(t1) == (os.SCHED_OTHER, 0)
        assert "threads restored" in err
        new.close()
    finally:
        peer.kill()
        peer.wait()
