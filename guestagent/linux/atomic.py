"""Replace a file so that readers see the old or the new content, whole, never a mix.

The new content goes to a temporary file in the same directory (rename(2) is
atomic only within one file system), then replaces the target. ``durable``
adds the fsyncs that make the replacement survive a power cut: of the file
before the rename and of the directory after it. A file rewritten every few
seconds for a scraper does not need them; a record that undoes changes after
a crash does.
"""

from __future__ import annotations

import os
import tempfile


def fsync_dir(path: str) -> None:
    """Make the directory's entries (a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace `path` with `data`, file mode `mode`; OSError when it cannot."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(directory)


def remove(path: str, durable: bool = True) -> None:
    """Unlink `path` if it exists; with `durable`, so that it stays gone after a crash."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    if durable:
        fsync_dir(os.path.dirname(path) or ".")
