"""The reference host peer as a subprocess serving a region file, and its status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

PERIOD = 0.2  # a short heartbeat period keeps the lease test fast
REGION_SIZE = 64 << 10  # QEMU sizes the backing file once, whatever the guest's layout


def start_peer(standin, tmp_path, region):
    status, state = str(tmp_path / "status.sock"), str(tmp_path / "state")
    cfg = tmp_path / "host.toml"
    cfg.write_text(f"heartbeat_period = {PERIOD}\nmax_rt_priority = 40\n"
                   "min_change_interval = 0\ncapacity_period = 0.2\n")
    peer = subprocess.Popen(
        [sys.executable, "-m", "guestagent.host.cli", "run", "--qmp", standin.qmp,
         "--region", region, "--config", str(cfg), "--status-socket", status,
         "--state-dir", state],
        stderr=subprocess.PIPE, text=True)
    return peer, status


def status_of(path):
    for _ in range(100):
        proc = subprocess.run([sys.executable, "-m", "guestagent.host.cli", "status", "--json",
                               "--status-socket", path], capture_output=True, text=True,
                              timeout=30)
        if proc.returncode == 0:
            return json.loads(proc.stdout)
        time.sleep(0.05)  # the peer has not bound its status socket yet
    raise AssertionError(proc.stderr)


def zeroed_region(path):
    with open(path, "wb") as f:
        f.truncate(REGION_SIZE)


def stop(peer):
    peer.send_signal(signal.SIGTERM)
    try:
        rc = peer.wait(10)
    finally:
        peer.kill()
    return rc, peer.stderr.read()
