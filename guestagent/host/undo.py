"""What the peer needs to undo its changes, as a JSON document: pure encode, decode, judge.

The peer writes one such record per VM before it first changes a thread (see
statefile.py), so that a peer killed with SIGKILL still leaves the host able to
put every thread back. The record is input from disk, so decoding trusts nothing:
a wrong type, a value out of range or another format version is refused whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from guestagent.host.settings import ThreadSettings
from guestagent.sched import POLICY_MASK, POLICY_NAMES
from guestagent.sched import SCHED_RESET_ON_FORK as RESET_ON_FORK

FORMAT = "guestagent-host-undo"
VERSION = 1
MAX_CPU = 1 << 16  # far above any host; bounds what a hostile affinity list can name
MAX_PID = 1 << 22  # the kernel's limit on pid_max
MAX_START = 1 << 62
EMULATOR = -1  # the "vcpu" index that records QEMU's main (emulator) thread
MAX_IOTHREADS = 256  # iothread n (0-based, in the VM's order) is recorded as EMULATOR - 1 - n
LOWEST_INDEX = EMULATOR - MAX_IOTHREADS


def iothread_index(n: int) -> int:
    """The thread index of a VM's n-th iothread (vCPUs are >= 0, the emulator -1)."""
    return EMULATOR - 1 - n


def thread_label(index: int) -> str:
    """How a thread index is shown: '0', 'emulator', 'iothread0'."""
    if index == EMULATOR:
        return "emulator"
    return f"iothread{EMULATOR - 1 - index}" if index < EMULATOR else str(index)


class StateError(ValueError):
    """A state file that must not be acted on; str(err) is one line."""


@dataclass(frozen=True)
class ProcessId:
    """A process or thread as the kernel tells them apart: id plus start time (stat field 22)."""

    pid: int
    start_time: int


@dataclass(frozen=True)
class ThreadRecord:
    vcpu: int
    thread: ProcessId
    original: ThreadSettings


@dataclass(frozen=True)
class UndoRecord:
    peer: ProcessId  # the peer that wrote it: while it runs, the record is its own
    qemu: ProcessId
    threads: tuple[ThreadRecord, ...]

    def with_thread(self, rec: ThreadRecord) -> UndoRecord:
        kept = tuple(t for t in self.threads if t.vcpu != rec.vcpu)
        return UndoRecord(self.peer, self.qemu, tuple(sorted(kept + (rec,),
                                                             key=lambda t: t.vcpu)))


def encode(record: UndoRecord) -> bytes:
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "peer": _encode_id(record.peer),
        "qemu": _encode_id(record.qemu),
        "threads": [_encode_thread(t) for t in record.threads],
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _encode_id(p: ProcessId) -> dict[str, int]:
    return {"pid": p.pid, "start_time": p.start_time}


def _encode_thread(t: ThreadRecord) -> dict[str, Any]:
    s = t.original
    return {"vcpu": t.vcpu, "tid": t.thread.pid, "start_time": t.thread.start_time,
            "policy": s.policy, "rt_priority": s.rt_priority, "nice": s.nice,
            "affinity": sorted(s.affinity)}


def decode(data: bytes) -> UndoRecord:
    """The record in `data`, or StateError naming the first thing wrong with it."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise StateError(f"not JSON: {err}") from None
    doc = _object(doc, "document")
    if doc.get("format") != FORMAT:
        raise StateError(f"format: expected {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise StateError(f"version {doc.get('version')!r}: this peer reads version {VERSION}")
    _no_other_keys(doc, {"format", "version", "peer", "qemu", "threads"}, "document")
    threads = doc.get("threads")
    if not isinstance(threads, list):
        raise StateError("threads: expected a list")
    record = UndoRecord(_decode_id(doc.get("peer"), "peer"), _decode_id(doc.get("qemu"), "qemu"),
                        tuple(_decode_thread(t, f"threads[{i}]") for i, t in enumerate(threads)))
    _unique([t.vcpu for t in record.threads], "vcpu")
    _unique([t.thread.pid for t in record.threads], "tid")
    return record


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StateError(f"{where}: expected an object")
    return value


def _no_other_keys(doc: dict[str, Any], keys: set[str], where: str) -> None:
    extra = sorted(set(doc) - keys)
    if extra:
        raise StateError(f"{where}: unknown key {extra[0]!r}")


def _int(doc: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool):  # bool is an int to Python
        raise StateError(f"{where}.{key}: expected an integer")
    if not low <= value <= high:
        raise StateError(f"{where}.{key}: {value} is out of range {low}..{high}")
    return value


def _decode_id(value: Any, where: str) -> ProcessId:
    doc = _object(value, where)
    _no_other_keys(doc, {"pid", "start_time"}, where)
    return ProcessId(_int(doc, "pid", where, 1, MAX_PID),
                     _int(doc, "start_time", where, 0, MAX_START))


def _decode_thread(value: Any, where: str) -> ThreadRecord:
    doc = _object(value, where)
    _no_other_keys(doc, {"vcpu", "tid", "start_time", "policy", "rt_priority", "nice",
                         "affinity"}, where)
    policy = _int(doc, "policy", where, 0, RESET_ON_FORK | POLICY_MASK)
    if policy & POLICY_MASK not in POLICY_NAMES or policy & ~(POLICY_MASK | RESET_ON_FORK):
        raise StateError(f"{where}.policy: {policy} is not a scheduling policy")
    affinity = doc.get("affinity")
    if (not isinstance(affinity, list) or not affinity
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < MAX_CPU
                       for c in affinity)):
        raise StateError(f"{where}.affinity: expected a non-empty list of CPU numbers")
    settings = ThreadSettings(policy, _int(doc, "rt_priority", where, 0, 99),
                              _int(doc, "nice", where, -20, 19), frozenset(affinity))
    thread = ProcessId(_int(doc, "tid", where, 1, MAX_PID),
                       _int(doc, "start_time", where, 0, MAX_START))
    return ThreadRecord(_int(doc, "vcpu", where, LOWEST_INDEX, 1 << 16), thread, settings)


def _unique(values: list[int], what: str) -> None:
    if len(set(values)) != len(values):
        raise StateError(f"threads: a {what} appears twice")


# What restore does with one recorded thread, judged from what /proc says now.
RESTORE, GONE, RECYCLED = "restore", "gone", "recycled"


def judge_thread(qemu_pid: int, rec: ThreadRecord, start_in_qemu: int | None,
                 start_anywhere: int | None) -> str:
    """RESTORE, GONE or RECYCLED; StateError if the record names a thread that is not QEMU's.

    start_in_qemu: the start time of /proc/<qemu>/task/<tid>, None if no such thread;
    start_anywhere: the start time of /proc/<tid>, whatever process it belongs to.
    """
    tid = rec.thread.pid
    if (tid == qemu_pid) != (rec.vcpu == EMULATOR):
        raise StateError(f"tid {tid} is QEMU's main thread, never a vCPU thread"
                         if tid == qemu_pid else
                         f"tid {tid} is recorded as the emulator thread but is not QEMU's main "
                         "thread")
    if start_in_qemu is not None:
        return RESTORE if start_in_qemu == rec.thread.start_time else RECYCLED
    if start_anywhere is None:
        return GONE
    if start_anywhere == rec.thread.start_time:
        # The very thread recorded lives in another process: it never was QEMU's.
        raise StateError(f"tid {tid} is a thread of another process, not of QEMU pid {qemu_pid}")
    return RECYCLED  # the vCPU thread exited and its tid went to another process
