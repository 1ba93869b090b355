"""Shared by the observation benchmarks: many live threads, and the limits they need.

Threads live in a few child processes with 64 KiB stacks, blocked on a pipe,
so they cost memory and pids but no CPU. Limits are raised for the run and
restored afterwards.
"""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

PER_CHILD = 2500


def _child(n: int, ready_w: int, hold_r: int) -> None:
    threading.stack_size(64 * 1024)
    gate = threading.Event()
    for _ in range(n):
        threading.Thread(target=gate.wait, daemon=True).start()
    os.write(ready_w, b"r")
    os.read(hold_r, 1)  # parent closes its end: exit
    os._exit(0)


@contextmanager
def raised_limits(threads: int) -> Iterator[None]:
    saved = {}
    want = {"/proc/sys/kernel/pid_max": threads + 32768,
            "/proc/sys/kernel/threads-max": threads * 2 + 20000}
    for path, value in want.items():
        try:
            with open(path) as f:
                old = int(f.read())
            if old < value:
                with open(path, "w") as f:
                    f.write(str(value))
                saved[path] = old
        except OSError as err:
            print(f"note: cannot raise {path} ({err.strerror}); continuing")
    old_nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (resource.RLIM_INFINITY,
                                                   resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass
    try:
        yield
    finally:
        for path, old in saved.items():
            with open(path, "w") as f:
                f.write(str(old))
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, old_nproc)
        except (ValueError, OSError):
            pass


@contextmanager
def live_threads(total: int) -> Iterator[int]:
    """Start about ``total`` sleeping threads in child processes; yields the count."""
    pids, holds = [], []
    left = total
    try:
        while left > 0:
            n = min(PER_CHILD, left)
            ready_r, ready_w = os.pipe()
            hold_r, hold_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(ready_r)
                os.close(hold_w)
                _child(n - 1, ready_w, hold_r)  # its main thread is one of the n
            os.close(ready_w)
            os.close(hold_r)
            os.read(ready_r, 1)
            os.close(ready_r)
            pids.append(pid)
            holds.append(hold_w)
            left -= n
        time.sleep(0.2)
        yield total
    finally:
        for fd in holds:
            os.close(fd)
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def count_threads() -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit()
               for _ in _tasks(p))


def _tasks(pid: str):
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def percentile(values, q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


signal.signal(signal.SIGCHLD, signal.SIG_DFL)
