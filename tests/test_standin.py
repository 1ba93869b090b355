"""The stand-in QEMU used by the host peer's tests names its threads as QEMU does."""

from __future__ import annotations

from helpers.standin import Standin


def test_standin_names_its_threads_like_qemu(tmp_path):
    s = Standin(str(tmp_path / "qmp"), 2)
    try:
        assert sorted(s.tids) == [0, 1] and s.pid not in s.tids.values()
    finally:
        s.stop()
