"""cloud-init/vendor-data.yaml on an image that already holds the package.

The image is the test image with the .deb installed by dpkg at build time (so
the unit is installed but not enabled); the NoCloud seed carries the project's
vendor-data and an empty user-data. The hints port and the ivshmem device are
there from the start, so udev starts the unit at boot, before cloud-init's
final stage enables and restarts it with the written config. The repository
disk is attached as in the first-boot tests, though nothing installs from it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import image as img
from testbed.systemd_vm import Disk, SystemdGuest

from .conftest import REPO_ROOT, record_boot

pytestmark = [pytest.mark.vm, pytest.mark.image]

UNIT = "guestagent.service"


@pytest.fixture(scope="module")
def guest(request: pytest.FixtureRequest, debs: list[Path], repo: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdGuest]:
    image = img.build_image(debs)
    work = tmp_path_factory.mktemp("guest-vendor")
    vendor_data = (REPO_ROOT / "cloud-init" / "vendor-data.yaml").read_text()
    seed = img.seed_disk("#cloud-config\n{}\n", work / "seed.iso",
                         f"guestagent-{uuid.uuid4().hex[:8]}", vendor_data=vendor_data)
    with SystemdGuest(image, image.kernel(rt=False), work,
                      disks=(Disk(repo, "garepo", readonly=True),
                             Disk(seed, "gaseed", readonly=True))) as vm:
        record_boot(request.config, "boot of the preinstalled image with vendor-data",
                    vm.boot_seconds)
        yield vm


def boot_journal(vm: SystemdGuest) -> list[str]:
    return vm.sh("journalctl -b -o cat --no-pager _PID=1").splitlines()


def test_udev_started_the_installed_unit_at_boot(guest):
    """Not enabled in the image, the unit was started before cloud-init's final stage."""
    props = guest.sh("udevadm info --query=property /dev/virtio-ports/org.guestagent.hints.0")
    assert f"SYSTEMD_WANTS={UNIT}" in props.split()
    journal = boot_journal(guest)
    first_start = next(i for i, ln in enumerate(journal)
                       if ln.startswith("Starting guestagent.service"))
    final = next(i for i, ln in enumerate(journal) if ln.startswith("Starting cloud-final"))
    assert first_start < final, journal[min(first_start, final):][:40]


def test_vendor_data_writes_the_config_enables_and_restarts(guest):
    status = guest.sh("cloud-init status --long", check=False)
    assert "status: done" in status, status
    assert guest.sh("cat /etc/guestagent/guestagent.toml") == \
        (REPO_ROOT / "cloud-init" / "guestagent.toml").read_text()
    assert guest.sh(f"systemctl is-enabled {UNIT}").strip() == "enabled"
    guest.wait_until(f"systemctl is-active --quiet {UNIT}", timeout=180)
    status = guest.sh("guestagent status --json")
    assert '"config": "/etc/guestagent/guestagent.toml"' in status
    starts = [ln for ln in boot_journal(guest) if ln.startswith("Starting guestagent.service")]
    assert len(starts) >= 2, "cloud-init's runcmd did not restart the unit"
