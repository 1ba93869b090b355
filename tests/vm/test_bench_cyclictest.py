"""bench/vm_latency end to end, briefly: one real guest, one short round of three modes.

Checks what the benchmark does to QEMU's threads (it asserts no timing): static makes
every vCPU thread and the main loop RT for its window and nothing else does; under
guestagent the host service boosts the vCPU the guest's RT task is pinned on.
"""

from __future__ import annotations

import re

import pytest
from helpers.vm import require_vm

from bench.vm_latency.run import main

pytestmark = [pytest.mark.vm, pytest.mark.root]


def _rt_shares(out: str, mode: str) -> dict[str, int]:
    """Thread -> percent of the mode's time at RT, from the host table."""
    lines = out.splitlines()
    head = next(ln for ln in lines if ln.startswith("mode") and "time RT:" in ln)
    names = re.split(r"\s{2,}", head.split("time RT:", 1)[1].strip())
    row = next(ln for ln in lines if ln.startswith(f"{mode} ") and "%" in ln)
    return dict(zip(names, (int(p) for p in re.findall(r"(\d+)%", row))))


def test_short_run_of_none_static_guestagent(tmp_path, capsys) -> None:
    require_vm()
    png = tmp_path / "plot.png"
    rc = main(["--seconds", "4", "--rounds", "1", "--modes", "none,static,guestagent",
               "--png", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not recorded in docs/performance.md" in out
    static, none = _rt_shares(out, "static"), _rt_shares(out, "none")
    for thread in ("main loop", "CPU 0/TCG", "CPU 1/TCG"):
        assert static[thread] >= 90, out
        assert none[thread] == 0, out
    hinted = _rt_shares(out, "guestagent")
    assert hinted["CPU 1/TCG"] > 0, out
    assert hinted["main loop"] > 0, out  # serve's emulator policy under TCG: "follow"
    assert hinted["CPU 0/TCG"] == 0, out  # the batch vCPU is never boosted
    assert re.search(r"guest RT task started -> vCPU 1 thread RT on the host: \d", out), out
    assert "guest p99 guestagent / static" in out and "host work/s guestagent / static" in out
