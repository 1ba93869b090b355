"""Fixtures shared by the test modules; the helpers they use live in tests/helpers/."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from helpers.standin import Standin

from guestagent.observe.schedwatch import TRACEFS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "root: needs root (real-time policies, other processes' threads, mounts)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: sets real-time policies or changes other "
                                   "processes' threads (run the suite as root)")
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(skip)


@pytest.fixture
def standin(tmp_path) -> Iterator[Standin]:
    """A process standing in for QEMU: threads named `CPU n/KVM` and a QMP socket."""
    s = Standin(str(tmp_path / "qmp.sock"), 2)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tracefs() -> Iterator[str]:
    """systemd mounts tracefs at boot; where init did not (a CI machine), mount it for
    the session and unmount it afterwards."""
    if any(os.path.exists(f"{root}/events") for root in TRACEFS):
        yield next(root for root in TRACEFS if os.path.exists(f"{root}/events"))
        return
    subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS[0]], check=True)
    try:
        yield TRACEFS[0]
    finally:
        subprocess.run(["umount", TRACEFS[0]], check=False)
