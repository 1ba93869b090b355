"""Real threads with real scheduling policies, names and affinities, for tests."""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SchedThread:
    """A sleeping thread that set its own policy, comm and affinity (Linux applies
    sched_setscheduler(0, ...) and sched_setaffinity(0, ...) to the calling thread)."""

    def __init__(self, policy: int, priority: int = 0, comm: bytes | None = None,
                 cpus: set | None = None, nice: int | None = None,
                 deadline: tuple | None = None) -> None:
        self._args = (policy, priority, comm, cpus, nice, deadline)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self.tid = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        policy, priority, comm, cpus, nice, deadline = self._args
        try:
            self.tid = threading.get_native_id()
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            if comm is not None:
                with open(f"/proc/self/task/{self.tid}/comm", "wb") as f:
                    f.write(comm)
            if nice is not None:
                os.setpriority(os.PRIO_PROCESS, self.tid, nice)
            if deadline is not None:
                sched_setattr_deadline(*deadline)
            else:
                os.sched_setscheduler(0, policy, os.sched_param(priority))
        except BaseException as err:  # reported to the test, which skips or fails
            self.error = err
        finally:
            self._ready.set()
        self._stop.wait(60)

    def start(self) -> SchedThread:
        self._thread.start()
        self._ready.wait(10)
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@contextmanager
def sched_thread(*args, **kwargs) -> Iterator[SchedThread]:
    t = SchedThread(*args, **kwargs)
    try:
        yield t.start()
    finally:
        t.stop()


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64)]


def sched_setattr_deadline(runtime: int, deadline: int, period: int) -> None:
    """SCHED_DEADLINE for the calling thread (os has no sched_setattr wrapper)."""
    nr = {"x86_64": 314, "aarch64": 274}.get(os.uname().machine)
    if nr is None:
        raise OSError(38, "sched_setattr syscall number unknown on this arch")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _SchedAttr(ctypes.sizeof(_SchedAttr), 6, 0, 0, 0, runtime, deadline, period)
    if libc.syscall(nr, 0, ctypes.byref(attr), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Sleeper:
    """A thread that waits, for other threads to change."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.stop.wait, daemon=True)
        self.thread.start()
        self.tid = self.thread.native_id

    def end(self) -> None:
        self.stop.set()
        self.thread.join()


class RealTimeParent:
    """A SCHED_FIFO thread that starts children on request. They are born FIFO
    (pthread_create inherits the policy) and make no scheduling call of their own."""

    def __init__(self, priority: int) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._children: queue.Queue = queue.Queue()
        self._priority = priority
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self._priority))
        except OSError as err:
            self._children.put(err)
            return
        while self._requests.get():
            self._children.put(Sleeper())

    def spawn(self) -> Sleeper:
        self._requests.put(True)
        child = self._children.get(timeout=10)
        if isinstance(child, BaseException):
            raise child
        assert os.sched_getscheduler(child.tid) == os.SCHED_FIFO, "born FIFO"
        return child

    def end(self) -> None:
        self._requests.put(False)
        self._thread.join(10)


@contextmanager
def real_time_parent(priority: int) -> Iterator[RealTimeParent]:
    parent = RealTimeParent(priority)
    try:
        yield parent
    finally:
        parent.end()

