"""Mapping the shared region: a file (e.g. under /dev/shm) or an ivshmem BAR.

Only IO lives here: find, open, size and mmap. What the bytes mean is
guestagent.protocol.region; who writes which line is the region links' job.
"""

from __future__ import annotations

import errno
import fcntl
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
    """A shared mapping, where it came from and its file; close() unmaps it.

    A file that shrinks under a mapping makes the next access past its end a
    SIGBUS, which kills a Python process: call shrunk() before touching mm.
    """

    mm: mmap.mmap
    size: int
    source: str
    fd: int = -1  # kept open for shrunk() (and the lock, if taken)

    def shrunk(self) -> str | None:
        """Why the mapping must not be touched now (the file is shorter than the
        mapping, or cannot be looked at), or None."""
        if self.fd < 0:
            return None
        try:
            now = os.fstat(self.fd).st_size
        except OSError as err:
            return f"cannot look at {self.source}: {err.strerror or err}"
        if now < self.size:
            return f"{self.source} shrank to {now} bytes under a mapping of {self.size}"
        return None

    def close(self) -> None:
        if not self.mm.closed:
            self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _oserror(action: str, path: str, err: OSError) -> GuestagentError:
    return GuestagentError(f"cannot {action} {path}: {err.strerror or err}")


def lock_holder(fd: int, locks: str = "/proc/locks") -> int | None:
    """The pid holding a flock on fd's file, from /proc/locks (None if not found)."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(locks) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == want:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def _lock(fd: int, path: str) -> None:
    """One agent per region: a second one would overwrite the first one's hints."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return  # a filesystem without locks: go on unlocked
        pid = lock_holder(fd)
        who = f"pid {pid}" if pid is not None else "another process"
        raise GuestagentError(f"region {path} is in use by {who}") from None


def map_file(path: str, size: int | None = None, min_size: int = 0,
             lock: bool = False) -> MappedRegion:
    """Map a region file; with size, create it or grow it to that size first.
    With lock, hold an exclusive flock on it for as long as it is mapped."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if size is not None else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        raise _oserror("open region", path, err) from None
    try:
        if lock:
            _lock(fd, path)
        actual = os.fstat(fd).st_size
        if size is not None and actual < size:
            os.ftruncate(fd, size)
            actual = size
        if actual < max(min_size, 1):
            raise GuestagentError(f"region {path} is too small: {actual} bytes, need "
                                  f"{max(min_size, 1)}")
        mm = mmap.mmap(fd, actual, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as err:
        os.close(fd)
        raise _oserror("map region", path, err) from None
    except BaseException:
        os.close(fd)
        raise
    return MappedRegion(mm, actual, path, fd)


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
                min_size: int = 0, lock: bool = False) -> MappedRegion:
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
    return map_file(str(dev / "resource2"), min_size=min_size, lock=lock)
