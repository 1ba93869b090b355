"""State files on disk: record what to undo before a change, restore what a dead peer left.

One file per VM, `undo-qemu-<pid>-<start time>.json` in the state directory,
replaced atomically (temp file, fsync, rename, fsync of the directory) each time
the set of changed threads grows, and removed after a clean restore. A peer
killed with SIGKILL leaves its file behind; `guestagent-host restore`, or the
next peer at start, puts the recorded settings back on every thread that is
still the same thread of the same QEMU, and never touches any other.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from guestagent.errors import GuestagentError
from guestagent.host.applier import read_settings, write_settings
from guestagent.host.discovery import thread_start_time
from guestagent.host.settings import ThreadSettings
from guestagent.host.undo import (
    GONE,
    RESTORE,
    ProcessId,
    StateError,
    ThreadRecord,
    UndoRecord,
    decode,
    encode,
    judge_thread,
)
from guestagent.linux.atomic import remove, write_atomically

STATE_NAME = re.compile(r"undo-qemu-(\d+)-(\d+)\.json\Z")
MAX_STATE_SIZE = 1 << 16  # a VM with hundreds of vCPUs needs a few tens of KiB

# What became of one state file.
RESTORED = "restored"  # done (or nothing left to do); the file is gone
REFUSED = "refused"  # not acted on; the file stays for an operator to look at
IN_USE = "in use"  # its peer still runs; left alone
INCOMPLETE = "incomplete"  # a thread could not be put back; the file stays for a retry
PLANNED = "planned"  # dry run: logged what would be done


def process_id(pid: int) -> ProcessId | None:
    """The live process (or thread) `pid` with its start time; None if there is none."""
    start = thread_start_time(pid, pid)
    return None if start is None else ProcessId(pid, start)


def state_path(state_dir: str, qemu: ProcessId) -> str:
    return os.path.join(state_dir, f"undo-qemu-{qemu.pid}-{qemu.start_time}.json")


def check_state_dir(path: str) -> None:
    """Refuse a directory someone else could plant state files in."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise GuestagentError(f"state directory {path} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise GuestagentError(f"state directory {path} must be owned by uid {os.geteuid()} "
                              "and not writable by group or others")


def ensure_state_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as err:
        raise GuestagentError(f"cannot create state directory {path}: "
                              f"{err.strerror or err}") from None
    check_state_dir(path)


def read_state_file(path: str) -> UndoRecord:
    """The record in `path`; StateError unless it is ours, private, small and well formed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise StateError(f"cannot open: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateError("not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise StateError(f"must be owned by uid {os.geteuid()} with mode 0600")
        data = os.read(fd, MAX_STATE_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_STATE_SIZE:
        raise StateError(f"larger than {MAX_STATE_SIZE} bytes")
    return decode(data)


class UndoJournal:
    """The state file of one VM, as its peer keeps it: grows before each first change."""

    def __init__(self, state_dir: str, qemu: ProcessId, peer: ProcessId) -> None:
        self.path = state_path(state_dir, qemu)
        self.record = UndoRecord(peer, qemu, ())

    def recorded(self) -> frozenset[int]:
        return frozenset(t.vcpu for t in self.record.threads)

    def record_thread(self, vcpu: int, thread: ProcessId, original: ThreadSettings) -> None:
        """Durably add one thread's original settings; OSError if that cannot be done."""
        grown = self.record.with_thread(ThreadRecord(vcpu, thread, original))
        write_atomically(self.path, encode(grown))
        self.record = grown

    def discard(self) -> None:
        """Every change is undone: nothing is left to restore."""
        remove(self.path)
        self.record = UndoRecord(self.record.peer, self.record.qemu, ())


@dataclass(frozen=True)
class FileOutcome:
    path: str
    qemu: ProcessId  # from the file's name, so even a refused file says which VM it is for
    result: str
    lines: tuple[str, ...]


def state_files(state_dir: str) -> Iterator[tuple[str, ProcessId]]:
    """(path, QEMU named by the file name) for each state file; none if the dir is missing."""
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return
    for name in names:
        match = STATE_NAME.match(name)
        if match:
            yield os.path.join(state_dir, name), ProcessId(int(match[1]), int(match[2]))


def restore_leftovers(state_dir: str, dry_run: bool) -> list[FileOutcome]:
    """Apply every state file a peer left behind in `state_dir`."""
    if not os.path.isdir(state_dir):
        return []
    check_state_dir(state_dir)
    return [restore_file(path, qemu, dry_run) for path, qemu in state_files(state_dir)]


def restore_file(path: str, qemu: ProcessId, dry_run: bool) -> FileOutcome:
    def outcome(result: str, *lines: str) -> FileOutcome:
        return FileOutcome(path, qemu, result, tuple(f"{path}: {line}" for line in lines))

    try:
        record = read_state_file(path)
        if record.qemu != qemu:
            raise StateError(f"names QEMU pid {record.qemu.pid} {record.qemu.start_time}, "
                             "its file name another")
    except StateError as err:
        return outcome(REFUSED, f"refused, left in place: {err}")
    if process_id(record.peer.pid) == record.peer:
        return outcome(IN_USE, f"in use by the running peer pid {record.peer.pid}; left alone")
    if process_id(qemu.pid) != qemu:
        lines = [f"QEMU pid {qemu.pid} is gone; nothing to restore"]
        if not dry_run:
            remove(path)
        return outcome(PLANNED if dry_run else RESTORED, *lines)
    try:
        verdicts = [judge_thread(qemu.pid, t, thread_start_time(qemu.pid, t.thread.pid),
                                 thread_start_time(t.thread.pid, t.thread.pid))
                    for t in record.threads]
    except StateError as err:
        return outcome(REFUSED, f"refused, left in place: {err}")
    lines, ok = _restore_threads(record.threads, verdicts, dry_run)
    if dry_run:
        return outcome(PLANNED, *lines)
    if not ok:
        return outcome(INCOMPLETE, *lines, "kept for a later `guestagent-host restore`")
    remove(path)
    return outcome(RESTORED, *lines)


def _restore_threads(threads: tuple[ThreadRecord, ...], verdicts: list[str],
                     dry_run: bool) -> tuple[list[str], bool]:
    lines, ok = [], True
    for rec, verdict in zip(threads, verdicts):
        what = f"vCPU {rec.vcpu} (tid {rec.thread.pid})"
        if verdict != RESTORE:
            why = "is gone" if verdict == GONE else "was recycled (start time differs)"
            lines.append(f"{what} {why}; left alone")
        elif dry_run:
            lines.append(f"dry run: {what}: would restore {rec.original.describe()}")
        else:
            done, text = _put_back(rec.thread.pid, rec.original)
            ok = ok and done
            lines.append(f"{what}: {text}")
    return lines, ok


def _put_back(tid: int, original: ThreadSettings) -> tuple[bool, str]:
    """(False, why) unless the thread has its original settings back or exited meanwhile."""
    try:
        # Diff against the kernel: whatever the dead peer last set, every field goes back.
        write_settings(tid, read_settings(tid), original)
    except ProcessLookupError:
        return True, "exited meanwhile; left alone"
    except OSError as err:
        return False, f"cannot restore {original.describe()}: {err.strerror or err}"
    return True, f"restored {original.describe()}"
