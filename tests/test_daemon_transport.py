"""The daemon's transports coming and going, and its metrics file, for real."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from helpers.agentproc import AgentProcess
from helpers.waiting import wait_for

from guestagent.agent.config import default_config
from guestagent.protocol.model import PeerState
from guestagent.transport.link import ALL_FEATURES
from guestagent.transport.region import find_ivshmem
from guestagent.transport.region_link import RegionHostLink
from guestagent.transport.select import Choice, available

pytestmark = pytest.mark.root


def config_text(tmp_path, mode="auto", extra=""):
    return f"""
[agent]
heartbeat_interval_ms = 100
sweep_interval_ms = 20
cpu_budget_percent = 5
[transport]
mode = "{mode}"
port_name = "{tmp_path / 'port.sock'}"
region_path = "{tmp_path / 'ivshmem-standin'}"
local_region = "{tmp_path / 'run' / 'region'}"
[control]
socket = "{tmp_path / 'control.sock'}"
{extra}"""


def transport_values(tmp_path, mode="auto"):
    values = dict(default_config().transport)
    values.update(mode=mode, port_name=str(tmp_path / "port.sock"),
                  region_path=str(tmp_path / "region"),
                  local_region=str(tmp_path / "local"))
    return values


def test_available_orders_region_channel_local(tmp_path):
    t = transport_values(tmp_path)
    assert available(t) == [Choice("local", str(tmp_path / "local"))]
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(t["port_name"])
        (tmp_path / "region").write_bytes(bytes(4096))
        assert [c.kind for c in available(t)] == ["region", "channel", "local"]
        assert [c.kind for c in available(dict(t, mode="channel"))] == ["channel"]
        # With no path set, region mode means the ivshmem device, and only if there is one.
        expected = [Choice("region", "ivshmem")] if find_ivshmem() else []
        assert available(dict(t, mode="region", region_path="")) == expected


def test_agent_moves_from_local_to_a_host_region_that_appears(tmp_path):
    cfg = tmp_path / "guestagent.toml"
    cfg.write_text(config_text(tmp_path))
    agent = AgentProcess(str(cfg), str(tmp_path / "control.sock"))
    try:
        status = agent.ask("status")["transport"]
        assert status["kind"] == "local" and os.path.exists(tmp_path / "run" / "region")
        # The host side creates the region file (as QEMU creates its backing file).
        region = tmp_path / "ivshmem-standin"
        region.write_bytes(bytes(1 << 20))
        agent.proc.send_signal(1)  # SIGHUP: a reload looks for transports again at once
        assert wait_for(lambda: agent.ask("status")["transport"]["kind"] == "region", 5)
        host = RegionHostLink(str(region), ALL_FEATURES)
        try:
            def guest_running():
                host.tick(time.monotonic())
                return host.view().guest_state is PeerState.RUNNING and host.view().hints
            assert wait_for(guest_running, 5)
            nr = len(host.view().hints)
            assert nr == max(os.sched_getaffinity(0)) + 1 or nr >= os.cpu_count()
        finally:
            host.close()
        region.unlink()
    finally:
        agent.kill()


def test_metrics_file_is_written_for_node_exporter(tmp_path):
    prom = tmp_path / "textfile"
    prom.mkdir()
    cfg = tmp_path / "guestagent.toml"
    cfg.write_text(config_text(tmp_path, mode="local",
                               extra=f'[metrics]\ntextfile_dir = "{prom}"\ninterval_ms = 1000\n'))
    agent = AgentProcess(str(cfg), str(tmp_path / "control.sock"))
    try:
        path = prom / "guestagent.prom"
        assert wait_for(path.exists, 5)
        text = path.read_text()
    finally:
        agent.kill()
    for family in ("guestagent_hint_request", "guestagent_sweep_seconds",
                   "guestagent_transport_up", "guestagent_errors_total"):
        assert f"# TYPE {family} " in text
    assert re.search(r'^guestagent_hint_request\{vcpu="0"\} [012]$', text, re.M)
    assert 'guestagent_transport_up{transport="local",link=' in text
    assert not [p for p in prom.iterdir() if p.name.startswith(".")], "no temp files left"


def test_unusable_config_is_one_line_and_nonzero(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[transport]\nmode = 'pigeon'\n")
    proc = subprocess.run([sys.executable, "-m", "guestagent", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert f"{cfg}:2: transport.mode must be one of" in proc.stderr
