"""QEMU's threads on the host: naming them, sampling their policy, and what the static and
isolated modes do to them."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from guestagent.host.service import schedstat_ns

from .timeline import MAIN_THREAD, ThreadSample

# Above the static mode's FIFO 1 so its samples are on time there too, below the host's
# FIFO cyclictest so that one does not feel the sampler.
SAMPLER_PRIORITY = 20
SAMPLE_PERIOD = 0.02
# A thread with no sample for this long, while others have them, has exited: the sampler
# stops sampling a thread at once when it is gone (it finds new ones within a second).
GONE_AFTER = 0.5
PROBE_PERIOD = 0.001
STATIC_PRIORITY = 1  # what Nova (hw:cpu_realtime), KubeVirt and libvirt's <vcpusched> set


def qemu_tasks(pid: int) -> dict[int, str]:
    """tid -> a name unique in the process: MAIN_THREAD, "CPU n/TCG", else "comm [tid]"."""
    out = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        tid = int(entry)
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # exited while we looked
        if tid == pid:
            out[tid] = MAIN_THREAD
        elif comm.startswith("CPU ") and "/" in comm:
            out[tid] = comm
        else:
            out[tid] = f"{comm} [{tid}]"
    return out


def read_state(tid: int, name: str) -> ThreadSample | None:
    try:
        policy = os.sched_getscheduler(tid)
        priority = os.sched_getparam(tid).sched_priority
        nice = os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return None  # the thread exited
    # /proc/TID/task/TID is the thread's own entry: no need to know its process here
    return ThreadSample(time.monotonic(), tid, name, policy, priority, nice,
                        schedstat_ns(tid, tid))


def accelerator(pid: int) -> str:
    """"TCG" or "KVM", from the vCPU threads' names: what QEMU really uses."""
    accels = {n.split("/", 1)[1] for n in qemu_tasks(pid).values() if n.startswith("CPU ")}
    return "/".join(sorted(accels)) or "unknown"


class Sampler:
    """A thread that samples every QEMU thread's policy each SAMPLE_PERIOD."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[ThreadSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(SAMPLER_PRIORITY))
        except OSError:
            pass  # not root: samples come late under load, the figures say so by their gaps
        tasks: dict[int, str] = {}
        refreshed = float("-inf")
        while not self._stop.wait(SAMPLE_PERIOD):
            now = time.monotonic()
            if now - refreshed > 1.0:
                try:
                    tasks = qemu_tasks(self.pid)
                except OSError:
                    return  # QEMU is gone
                refreshed = now
            batch = [s for s in (read_state(t, n) for t, n in tasks.items()) if s]
            with self._lock:
                self.samples.extend(batch)

    def snapshot(self) -> list[ThreadSample]:
        with self._lock:
            return list(self.samples)


def probe_boost(tids: dict[str, int], timeout: float) -> dict[str, float]:
    """Poll the named threads every PROBE_PERIOD until each is RT or ``timeout`` passes;
    name -> the monotonic time it was first seen RT."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(tids) and time.monotonic() < deadline:
        for name, tid in tids.items():
            if name not in seen:
                s = read_state(tid, name)
                if s is not None and s.boosted:
                    seen[name] = s.t
        time.sleep(PROBE_PERIOD)
    return seen


def _rt(tid: int) -> bool:
    return os.sched_getscheduler(tid) & 0xFF in (os.SCHED_FIFO, os.SCHED_RR)


def _threads_where(pid: int, test: Callable[[int], bool]) -> set[int]:
    """The threads of QEMU ``pid`` for which ``test(tid)`` holds now."""
    out = set()
    for tid in qemu_tasks(pid):
        with contextlib.suppress(OSError):  # exited meanwhile
            if test(tid):
                out.add(tid)
    return out


def rt_threads(pid: int) -> set[int]:
    """The threads of QEMU ``pid`` at an RT policy now."""
    return _threads_where(pid, _rt)


@contextlib.contextmanager
def static_rt(pid: int, tids: Iterable[int]) -> Iterator[None]:
    """Every given thread of QEMU ``pid`` SCHED_FIFO STATIC_PRIORITY while inside; the old
    policy after. Threads QEMU starts meanwhile inherit FIFO from their creator, as they do
    under libvirt's static setting; after, every thread that was not RT before goes back
    to SCHED_OTHER, checked until none is left (a thread can be started while we look)."""
    was_rt = rt_threads(pid)
    saved: list[tuple[int, int, int]] = []
    try:
        for tid in tids:
            saved.append((tid, os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority))
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(STATIC_PRIORITY))
        yield
    finally:
        for tid, policy, priority in saved:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, policy, os.sched_param(priority))
        for _ in range(10):
            try:
                left = rt_threads(pid) - was_rt
            except OSError:
                break  # QEMU is gone
            if not left:
                break
            lower(left)
            time.sleep(0.05)


def lower(tids: Iterable[int]) -> None:
    """SCHED_OTHER at nice 0 for each thread that still exists."""
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, 0)


def changed_threads(pid: int) -> set[int]:
    """The threads of QEMU ``pid`` at an RT policy or a nice level other than 0 now: what
    a mode may have left behind (QEMU starts every thread at SCHED_OTHER, nice 0)."""
    return _threads_where(pid, lambda tid: _rt(tid) or os.getpriority(os.PRIO_PROCESS, tid) != 0)


@contextlib.contextmanager
def pinned(pid: int, alone: Iterable[int], cpu: int, others: set[int]) -> Iterator[None]:
    """Threads ``alone`` of QEMU ``pid`` on ``cpu``, every other QEMU thread on ``others``,
    while inside; the old affinities after."""
    alone = set(alone)
    saved: list[tuple[int, set[int]]] = []
    try:
        for tid in qemu_tasks(pid):
            with contextlib.suppress(OSError):  # a thread that exits meanwhile
                saved.append((tid, os.sched_getaffinity(tid)))
                os.sched_setaffinity(tid, {cpu} if tid in alone else others)
        yield
    finally:
        for tid, old in saved:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, old)
