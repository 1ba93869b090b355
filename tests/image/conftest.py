"""Fixtures for tests that boot the Debian guest image with systemd as PID 1.

The image is built once and cached outside the repository (testbed/image.py);
the .debs are built from the tree once per session; each module boots its
guests once (module-scoped fixtures) because a TCG boot with cloud-init takes
minutes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import image as img
from testbed.debs import build_debs
from testbed.systemd_vm import SystemdGuest, missing_components

REPO_ROOT = Path(__file__).resolve().parents[2]


OPT_IN = "GUESTAGENT_IMAGE_TESTS"


def require_tools() -> None:
    # Opt-in until the suite fits CI's time: a cold image build takes about 6 minutes and
    # the three TCG boots (stock, PREEMPT_RT, vendor-data) about 16 more on these machines.
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"guest image tests are opt-in: set {OPT_IN}=1 (a cold build and three "
                    "TCG boots take over 20 minutes here)")
    missing = img.missing_tools() + missing_components()
    if missing:
        pytest.skip("guest image tests need " + "; ".join(missing))
    if os.geteuid() != 0:
        pytest.skip("guest image tests need root (mmdebstrap and mke2fs -d keep ownership)")


@pytest.fixture(scope="session")
def guest_image() -> img.GuestImage:
    require_tools()
    return img.build_image()


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The packages built from the tree, as a user would install them."""
    require_tools()
    return build_debs(tmp_path_factory.mktemp("debs"))


@pytest.fixture(scope="session")
def newer_debs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The same tree built with a higher Debian revision: an upgrade to a newer build."""
    require_tools()
    return build_debs(tmp_path_factory.mktemp("debs-next"), revision=2)


@pytest.fixture(scope="session")
def repo(debs: list[Path], newer_debs: list[Path],
         tmp_path_factory: pytest.TempPathFactory) -> Path:
    return img.repo_disk({"current": debs, "next": newer_debs},
                         tmp_path_factory.mktemp("repo") / "repo.ext4")


BOOTS = pytest.StashKey[list]()


def record_boot(config: pytest.Config, what: str, seconds: float | None) -> None:
    """Boot times, printed at the end of the run (the issue asks for the figure)."""
    config.stash.setdefault(BOOTS, []).append((what, seconds))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for what, seconds in config.stash.get(BOOTS, []):
        terminalreporter.write_line(f"guest image: {what}: ready in {seconds:.0f} s")


def user_data() -> str:
    """The project's user-data with only the local package source added."""
    return img.with_package_source((REPO_ROOT / "cloud-init" / "user-data.yaml").read_text())


def guest_report(guest: SystemdGuest) -> str:
    """The console tail and the agent's journal, for a failing test's report."""
    text = guest.console_tail(60)
    if guest.alive():
        try:
            text += "\n--- journalctl -u guestagent (last lines) ---\n" + guest.sh(
                "journalctl -b -u guestagent --no-pager -n 40", timeout=60, check=False)
        except Exception as err:  # the guest may have stopped answering
            text += f"\n(journal unavailable: {err})"
    return text


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach each booted guest's console and journal to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        guest = getattr(value, "guest", value)
        if isinstance(guest, SystemdGuest):
            report.sections.append((f"guest {name} ({guest.kernel.version})",
                                    guest_report(guest)))
