"""Find one VM's vCPU threads: QMP `query-cpus-fast`, else thread names.

Every thread id is checked against /proc/<qemu pid>/task, and its start time
is recorded, so the peer can never act on a thread of another process (or a
recycled tid) by mistake.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guestagent.errors import GuestagentError
from guestagent.host.qmp import QmpClient
from guestagent.linux.procfs import ParseError, parse_stat

VCPU_NAME = re.compile(r"CPU (\d+)/(KVM|TCG)\Z")


@dataclass(frozen=True)
class VcpuThread:
    vcpu: int
    tid: int
    start_time: int  # StatFields.start_time: tells a recycled tid apart


def parse_cpus_fast(reply: Any) -> dict[int, int]:
    """cpu-index -> thread-id from a query-cpus-fast reply; entries without both are skipped."""
    out: dict[int, int] = {}
    if not isinstance(reply, list):
        return out
    for cpu in reply:
        if not isinstance(cpu, dict):
            continue
        index, tid = cpu.get("cpu-index"), cpu.get("thread-id")
        if isinstance(index, int) and isinstance(tid, int) and index >= 0 and tid > 0:
            out[index] = tid
    return out


def vcpus_from_names(names: Mapping[int, str]) -> dict[int, int]:
    """vCPU -> tid from thread names `CPU n/KVM` or `CPU n/TCG` (tid -> comm)."""
    out: dict[int, int] = {}
    for tid, comm in sorted(names.items()):
        match = VCPU_NAME.match(comm.rstrip("\n"))
        if match:
            out.setdefault(int(match.group(1)), tid)
    return out


def thread_start_time(pid: int, tid: int) -> int | None:
    """Start time of a thread of `pid`, or None if `tid` is not (or no longer) one."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            return parse_stat(f.read()).start_time
    except (OSError, ParseError):
        return None


def thread_names(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError as err:
        raise GuestagentError(f"process {pid}: {err.strerror or err}") from None
    for entry in tids:
        try:
            with open(f"/proc/{pid}/task/{entry}/comm", encoding="utf-8",
                      errors="replace") as f:
                out[int(entry)] = f.read()
        except (OSError, ValueError):
            continue  # the thread exited while we looked
    return out


def checked_threads(pid: int, tids: Mapping[int, int]) -> tuple[VcpuThread, ...]:
    """Keep only tids that are threads of `pid`; refuse if none are."""
    found = []
    for vcpu, tid in sorted(tids.items()):
        start = thread_start_time(pid, tid)
        if start is not None:
            found.append(VcpuThread(vcpu, tid, start))
    if not found:
        raise GuestagentError(f"process {pid} has none of the vCPU threads reported")
    return tuple(found)


def iothread_tids(qmp_path: str | None, pid: int, ids: Sequence[str]) -> dict[str, int]:
    """Thread ids of QEMU's iothreads by object id: `query-iothreads` over QMP, else the
    thread names QEMU gives them (`IO ID`, with -name debug-threads=on)."""
    found: dict[str, int] = {}
    if qmp_path is not None:
        try:
            with QmpClient(qmp_path) as qmp:
                reply = qmp.execute("query-iothreads")
            for item in reply if isinstance(reply, list) else ():
                if (isinstance(item, dict) and isinstance(item.get("id"), str)
                        and isinstance(item.get("thread-id"), int)
                        and not isinstance(item.get("thread-id"), bool)):
                    found[item["id"]] = item["thread-id"]
        except GuestagentError:
            pass
    if not found:
        found = {name.strip()[3:]: tid for tid, name in thread_names(pid).items()
                 if name.startswith("IO ")}
    return {i: found[i] for i in ids if i in found}


def discover(qmp_path: str | None, pid: int | None = None
             ) -> tuple[int, tuple[VcpuThread, ...]]:
    """(QEMU pid, its vCPU threads). The pid comes from the QMP socket's peer unless given."""
    tids: dict[int, int] = {}
    if qmp_path is not None:
        with QmpClient(qmp_path) as qmp:
            peer = qmp.peer_pid()
            if pid is not None and pid != peer:
                raise GuestagentError(f"{qmp_path} is served by pid {peer}, not {pid}")
            pid = peer
            try:
                tids = parse_cpus_fast(qmp.execute("query-cpus-fast"))
            except GuestagentError:
                tids = {}  # older QEMU: fall back to thread names below
    if pid is None:
        raise GuestagentError("need --qmp SOCKET or --pid PID to find the vCPU threads")
    if not tids:
        tids = vcpus_from_names(thread_names(pid))
        if not tids:
            raise GuestagentError(f"process {pid} has no threads named 'CPU n/KVM' or 'CPU n/TCG'")
    return pid, checked_threads(pid, tids)
