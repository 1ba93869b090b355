"""The host's own batch load: busy workers pinned per CPU that count the work they do."""

from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence

from .figures import LoadSample

UNIT_ITERATIONS = 20000  # one work unit: an empty Python loop of this many iterations
# A worker stores its count in its own 8-byte slot of a shared file; nothing else is
# shared. The store is one aligned 8-byte write through a "Q" view: struct.pack_into
# zeroes the slot before it packs, and a sample taken between the two read 0.
WORKER = f"""
import mmap, os, sys
path, slot, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.sched_setaffinity(0, {{cpu}})
with open(path, "r+b") as f:
    counters = memoryview(mmap.mmap(f.fileno(), 0)).cast("Q")
done = 0
while True:
    for _ in range({UNIT_ITERATIONS}):
        pass
    done += 1
    counters[slot] = done
"""


class LoadError(Exception):
    """A host load worker is gone: the throughput figures would be wrong."""


class HostLoad:
    """``per_cpu`` workers pinned to each CPU in ``cpus``, at the default policy and nice:
    more runnable threads than CPUs, as on an oversubscribed host."""

    def __init__(self, cpus: Sequence[int], per_cpu: int) -> None:
        self.cpus = list(cpus)
        self.homes = [cpu for cpu in self.cpus for _ in range(per_cpu)]
        self.path = f"/dev/shm/guestagent-bench-load-{uuid.uuid4().hex[:12]}"
        self.procs: list[subprocess.Popen] = []
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> HostLoad:
        with open(self.path, "wb") as f:
            f.truncate(8 * len(self.homes))
        with open(self.path, "r+b") as f:
            self._counters = mmap.mmap(f.fileno(), 0)
        self.procs = [subprocess.Popen([sys.executable, "-c", WORKER, self.path, str(slot),
                                        str(cpu)])
                      for slot, cpu in enumerate(self.homes)]
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self._counters.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def sample(self) -> LoadSample:
        work = sum(struct.unpack_from(f"{len(self.homes)}Q", self._counters))
        ticks = 0
        for p, cpu in zip(self.procs, self.homes):
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                raise LoadError(f"host load worker {p.pid} (CPU {cpu}) is gone, exit status "
                                f"{p.poll()}") from None
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return LoadSample(time.monotonic(), work, ticks / self._tick)

    def pause(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGCONT)

    def confine(self, cpus: Sequence[int]) -> None:
        """Move every worker onto ``cpus`` (for the isolated reference)."""
        for p in self.procs:
            os.sched_setaffinity(p.pid, set(cpus))

    def rehome(self) -> None:
        for p, cpu in zip(self.procs, self.homes):
            os.sched_setaffinity(p.pid, {cpu})
