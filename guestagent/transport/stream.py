"""Non-blocking byte streams for the channel: the virtio-serial port and unix sockets.

Only IO: open, connect, listen, read, write. Framing and meaning are in
guestagent.protocol.channel / .connection; reconnecting is the links' job.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
from pathlib import Path

from guestagent.errors import GuestagentError

PORTS_DIR = "/dev/virtio-ports"
PORTS_SYSFS = "/sys/class/virtio-ports"
READ_SIZE = 65536
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


def resolve_port(name: str, dev_dir: str = PORTS_DIR, sysfs: str = PORTS_SYSFS) -> str:
    """Device path of a virtio-serial port given by name (or already a path).

    /dev/virtio-ports/<name> is a udev symlink; without udev, the port's
    /sys/class/virtio-ports/vportNpM/name file says which /dev/vportNpM it is.
    """
    if os.sep in name:
        return name
    link = os.path.join(dev_dir, name)
    if os.path.exists(link):
        return link
    try:
        for entry in sorted(Path(sysfs).iterdir()):
            try:
                if (entry / "name").read_text().strip() == name:
                    return os.path.join("/dev", entry.name)
            except OSError:
                continue
    except OSError:
        pass
    raise GuestagentError(f"no virtio-serial port named {name!r} (looked in {dev_dir} "
                          f"and {sysfs})")


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def open_port(path: str) -> int:
    """Open a port device non-blocking; OSError (e.g. EBUSY: held by another process)."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)


def connect_unix(path: str) -> socket.socket:
    """Connect to a listening unix stream socket; OSError if nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)  # local connects complete at once or fail at once
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def listen_unix(path: str) -> socket.socket:
    """Listen on path (replacing a stale socket file left by a previous run)."""
    if is_socket(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
    except OSError as err:
        sock.close()
        raise GuestagentError(f"cannot listen on {path}: {err.strerror or err}") from None
    sock.setblocking(False)
    return sock


def read_some(fd: int) -> bytes | None:
    """Bytes available now; b"" at end of stream (or hang-up); None if none yet."""
    try:
        return os.read(fd, READ_SIZE)
    except OSError as err:
        if err.errno in _WOULD_BLOCK:
            return None
        if err.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
            return b""
        raise


def write_some(fd: int, data: bytes | bytearray) -> int:
    """Write what the stream takes now (maybe nothing); -1 if the peer is gone."""
    try:
        return os.write(fd, data)
    except OSError as err:
        if err.errno in _WOULD_BLOCK or err.errno == errno.ENOBUFS:
            return 0
        if err.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ENXIO):
            return -1
        raise


def hung_up(fd: int) -> bool:
    """True while poll() reports POLLHUP (the port's host end is closed)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))
