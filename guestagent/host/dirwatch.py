"""Know soon when files in a directory change: inotify through ctypes, polling as a fallback.

The service rescans libvirt's status directory and the drop-in directory when
this says so. inotify gives a readable fd the loop waits on; a directory that
does not exist yet (libvirtd not started) cannot be watched, so it is looked
for again on every poll, and a rescan every `poll` seconds catches anything
inotify could not tell (an unavailable inotify, a queue overflow).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_MODIFY
        | IN_DELETE_SELF | IN_MOVE_SELF)
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1  # noqa: B018 - present on glibc and musl
        return libc
    except (OSError, AttributeError):
        return None


class DirWatch:
    """Watch one directory. fileno() is None while there is nothing to wait on."""

    def __init__(self, path: str, poll: float = 2.0) -> None:
        self.path = path
        self.poll = poll
        self._libc = _libc()
        self._fd: int | None = None
        self._wd: int | None = None
        if self._libc is not None:
            fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            self._fd = fd if fd >= 0 else None
        self._arm()

    def _arm(self) -> None:
        if self._fd is None or self._wd is not None:
            return
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(self.path), MASK)
        self._wd = wd if wd >= 0 else None

    @property
    def watching(self) -> bool:
        return self._wd is not None

    def fileno(self) -> int | None:
        return self._fd

    def drain(self) -> bool:
        """Read pending events; True if any of them says the directory changed."""
        if self._fd is None:
            return False
        changed = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            changed = True
            offset = 0
            while offset + EVENT.size <= len(data):
                _wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
                offset += EVENT.size + length
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF | 0x8000):  # IN_IGNORED
                    self._wd = None  # the directory went away: look for it on each poll
        return changed

    def tick(self) -> None:
        """On each poll: start watching a directory that has appeared."""
        self._arm()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._wd = None
