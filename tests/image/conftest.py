"""Fixtures for tests that boot the Debian guest image with systemd as PID 1.

The image is built once and cached outside the repository (testbed/image.py);
the .debs are built from the tree once per session. Two guests carry every
check, one per kernel, each booted once:

- ``stock``: the cached image on the stock kernel; cloud-init installs the
  package from the repository disk with the project's user-data (first boot).
- ``rt``: the image with the package preinstalled (built per run, beside the
  test's files), on the PREEMPT_RT kernel, with the project's vendor-data.

The second guest boots in the background while the first one's tests run
(GUESTAGENT_IMAGE_SERIAL=1 boots each only when its tests start): on two cores
the guests' idle waits overlap the other's work. A guest is shut down as soon
as its tests are done.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed import image as img
from testbed.debs import build_debs
from testbed.systemd_vm import Disk, SystemdGuest, missing_components

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("stock", "rt")
SERIAL = os.environ.get("GUESTAGENT_IMAGE_SERIAL") == "1"


def require_tools() -> None:
    missing = img.missing_tools() + missing_components()
    if missing:
        pytest.skip("guest image tests need " + "; ".join(missing))
    if os.geteuid() != 0:
        pytest.skip("guest image tests need root (mmdebstrap and mke2fs -d keep ownership)")


TIMES = pytest.StashKey[list]()
WANTED = pytest.StashKey[set]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The guests the selected tests need: only those are booted ahead."""
    wanted = {getattr(item, "callspec", None) and item.callspec.params.get("guest")
              for item in items if item.nodeid.startswith("tests/image/")}
    config.stash[WANTED] = wanted & set(KINDS)


def record(config: pytest.Config, what: str, seconds: float | None) -> None:
    """Where the time went, printed at the end of the run."""
    config.stash.setdefault(TIMES, []).append((what, seconds))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for what, seconds in config.stash.get(TIMES, []):
        shown = "not reached" if seconds is None else f"{seconds:.0f} s"
        terminalreporter.write_line(f"guest image: {what}: {shown}")


@pytest.fixture(scope="session")
def guest_image(request: pytest.FixtureRequest) -> img.GuestImage:
    require_tools()
    started = time.monotonic()
    image = img.build_image()
    record(request.config, "image (cached or built)", time.monotonic() - started)
    return image


@pytest.fixture(scope="session")
def packages(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The packages built from the tree (``current``) and the same tree with a higher
    Debian revision (``next``, an upgrade to a newer build), built side by side."""
    require_tools()
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        current = pool.submit(build_debs, tmp_path_factory.mktemp("debs"))
        newer = pool.submit(build_debs, tmp_path_factory.mktemp("debs-next"), 2)
        built = {"current": current.result(), "next": newer.result()}
    record(request.config, "two .deb builds", time.monotonic() - started)
    return built


@pytest.fixture(scope="session")
def repo(packages: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return img.repo_disk(packages, tmp_path_factory.mktemp("repo") / "repo.ext4")


def user_data() -> str:
    """The project's user-data with only the local package source added."""
    return img.with_package_source((REPO_ROOT / "cloud-init" / "user-data.yaml").read_text())


def vendor_data() -> str:
    return (REPO_ROOT / "cloud-init" / "vendor-data.yaml").read_text()


class Fleet:
    """The two guests, each booted once (in a thread), closed when its tests end."""

    def __init__(self, config: pytest.Config, base: img.GuestImage,
                 debs: list[Path], repo: Path, work: Path) -> None:
        self.config, self.base, self.debs, self.repo, self.work = config, base, debs, repo, work
        self.guests: dict[str, SystemdGuest] = {}
        self.errors: dict[str, BaseException] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.lock = threading.Lock()

    def _make(self, kind: str) -> SystemdGuest:
        work = self.work / kind
        work.mkdir()
        instance = f"guestagent-{uuid.uuid4().hex[:8]}"
        if kind == "stock":
            image = self.base
            seed = img.seed_disk(user_data(), work / "seed.iso", instance)
        else:
            started = time.monotonic()
            image = img.preinstalled_image(self.debs, work / "root.ext4")
            record(self.config, "image with the package preinstalled",
                   time.monotonic() - started)
            seed = img.seed_disk("#cloud-config\n{}\n", work / "seed.iso", instance,
                                 vendor_data=vendor_data())
        scratch = work / "io.img"  # the disk whose threaded IRQ the RT tests make busy
        with open(scratch, "wb") as f:
            f.truncate(64 << 20)
        disks = (Disk(self.repo, "garepo", readonly=True), Disk(seed, "gaseed", readonly=True),
                 Disk(scratch, "gaio", queues=1, msix=False))
        return SystemdGuest(image, image.kernel(kind == "rt"), work, disks=disks)

    def _boot(self, kind: str) -> None:
        started = time.monotonic()
        try:
            vm = self._make(kind)
            with self.lock:
                self.guests[kind] = vm
            vm.boot()
            record(self.config, f"{kind} guest: QEMU start to boot done",
                   vm.boot_seconds)
        except BaseException as err:  # re-raised in the test that needs this guest
            self.errors[kind] = err
            record(self.config, f"{kind} guest: failed after", time.monotonic() - started)

    def start(self, kind: str) -> None:
        if kind not in self.threads:
            self.threads[kind] = threading.Thread(target=self._boot, args=(kind,),
                                                  name=f"boot-{kind}", daemon=True)
            self.threads[kind].start()

    def get(self, kind: str) -> SystemdGuest:
        self.start(kind)
        if not SERIAL:
            for other in self.config.stash.get(WANTED, set()):
                self.start(other)
        started = time.monotonic()
        self.threads[kind].join()
        record(self.config, f"{kind} guest: tests waited for its boot",
               time.monotonic() - started)
        if kind in self.errors:
            raise self.errors[kind]
        return self.guests[kind]

    def close(self, kind: str) -> None:
        with self.lock:
            vm = self.guests.pop(kind, None)
        if vm is not None:
            vm.close()

    def close_all(self) -> None:
        for kind, thread in self.threads.items():
            thread.join()
            self.close(kind)


@pytest.fixture(scope="session")
def fleet(request: pytest.FixtureRequest, guest_image: img.GuestImage,
          packages: dict[str, list[Path]], repo: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(request.config, guest_image, packages["current"], repo,
              tmp_path_factory.mktemp("guests"))
    try:
        yield f
    finally:
        f.close_all()


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
