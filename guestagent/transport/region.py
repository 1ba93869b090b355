"""Mapping the shared region: a file (e.g. under /dev/shm) or an ivshmem BAR.

Only IO lives here: find, open, size and mmap. What the bytes mean is
guestagent.protocol.region; who writes which line is the region links' job.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from guestagent.errors import GuestagentError

IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
PCI_DEVICES = "/sys/bus/pci/devices"


@dataclass
class MappedRegion:
    """A shared mapping and where it came from; close() unmaps it."""

    mm: mmap.mmap
    size: int
    source: str

    def close(self) -> None:
        if not self.mm.closed:
            self.mm.close()


def _oserror(action: str, path: str, err: OSError) -> GuestagentError:
    return GuestagentError(f"cannot {action} {path}: {err.strerror or err}")


def map_file(path: str, size: int | None = None, min_size: int = 0) -> MappedRegion:
    """Map a region file; with size, create it or grow it to that size first."""
    flags = os.O_RDWR | (os.O_CREAT if size is not None else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        raise _oserror("open region", path, err) from None
    try:
        actual = os.fstat(fd).st_size
        if size is not None and actual < size:
            os.ftruncate(fd, size)
            actual = size
        if actual < max(min_size, 1):
            raise GuestagentError(f"region {path} is too small: {actual} bytes, need "
                                  f"{max(min_size, 1)}")
        mm = mmap.mmap(fd, actual, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as err:
        raise _oserror("map region", path, err) from None
    finally:
        os.close(fd)
    return MappedRegion(mm, actual, path)


def _read_id(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def find_ivshmem(root: str = PCI_DEVICES) -> list[Path]:
    """PCI device directories of ivshmem devices (vendor:device 1af4:1110), sorted."""
    try:
        entries = sorted(Path(root).iterdir())
    except OSError:
        return []
    return [d for d in entries
            if _read_id(d / "vendor") == IVSHMEM_VENDOR
            and _read_id(d / "device") == IVSHMEM_DEVICE]


def map_ivshmem(device: str | None = None, root: str = PCI_DEVICES,
                min_size: int = 0) -> MappedRegion:
    """Enable an ivshmem device (the first found, unless named) and map its BAR 2."""
    if device is None:
        found = find_ivshmem(root)
        if not found:
            raise GuestagentError(f"no ivshmem device (PCI {IVSHMEM_VENDOR:04x}:"
                                  f"{IVSHMEM_DEVICE:04x}) under {root}")
        dev = found[0]
    else:
        dev = Path(device) if os.sep in device else Path(root) / device
    enable = dev / "enable"
    try:
        if enable.read_text().strip() != "1":
            enable.write_text("1")
    except OSError as err:
        raise _oserror("enable ivshmem device", str(enable), err) from None
    return map_file(str(dev / "resource2"), min_size=min_size)
