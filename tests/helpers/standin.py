"""A process that stands in for QEMU in the host peer's tests.

Run as a script it starts threads named `CPU n/KVM` (as QEMU names its vCPU
threads) and serves a QMP unix socket answering `query-cpus-fast` with their
thread ids. It stands in for QEMU, which the end-to-end tests run for real.
    python3 -m tests.helpers.standin QMP_SOCKET NR_VCPUS [spin|sleep] [TCG]
With STANDIN_IOTHREADS=N it also starts N threads named `IO iothreadN` (QEMU's iothread
names) and answers `query-iothreads`. It prints "ready <pid>" once the threads are
named and the socket listens.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _vcpu_thread(index: int, accel: str, spin: bool, tids: dict, ready: threading.Event) -> None:
    tid = threading.get_native_id()
    with open(f"/proc/self/task/{tid}/comm", "w") as f:
        f.write(f"CPU {index}/{accel}")
    tids[index] = tid
    ready.set()
    while True:
        if spin:
            for _ in range(100000):
                pass
        else:
            time.sleep(3600)


IOTHREADS: dict[int, int] = {}  # iothread n -> tid, when STANDIN_IOTHREADS=N asks for them


def _iothread(index: int, ready: threading.Event) -> None:
    tid = threading.get_native_id()
    with open(f"/proc/self/task/{tid}/comm", "w") as f:
        f.write(f"IO iothread{index}")  # as QEMU names them (-name debug-threads=on)
    IOTHREADS[index] = tid
    ready.set()
    time.sleep(3600)


HOTPLUG: dict = {}  # what main() needs to start a vCPU thread on device_add


def _hotplug_vcpu() -> None:
    """A vCPU thread more, as QEMU starts one on device_add of a CPU."""
    ready = threading.Event()
    index = max(HOTPLUG["all"], default=-1) + 1
    threading.Thread(target=_vcpu_thread, args=(index, HOTPLUG["accel"], HOTPLUG["spin"],
                                                HOTPLUG["all"], ready), daemon=True).start()
    ready.wait()


def _serve_qmp(conn: socket.socket, tids: dict) -> None:
    with conn, conn.makefile("rwb") as f:
        f.write(b'{"QMP": {"version": {"qemu": {"major": 9}}, "capabilities": []}}\n')
        f.flush()
        for line in f:
            cmd = json.loads(line).get("execute")
            if cmd == "qmp_capabilities":
                reply = {"return": {}}
            elif cmd == "device_add" and HOTPLUG:
                _hotplug_vcpu()
                reply = {"return": {}}
            elif cmd == "query-iothreads" and os.environ.get("STANDIN_IOTHREADS"):
                reply = {"return": [{"id": f"iothread{i}", "thread-id": t}
                                    for i, t in sorted(IOTHREADS.items())]}
            elif cmd == "query-cpus-fast" and tids:
                f.write(b'{"event": "RESUME", "data": {}}\n')  # events may precede replies
                reply = {"return": [{"cpu-index": i, "thread-id": t, "target": "x86_64"}
                                    for i, t in sorted(tids.items())]}
            else:
                reply = {"error": {"class": "CommandNotFound", "desc": f"{cmd} not found"}}
            f.write(json.dumps(reply).encode() + b"\n")
            f.flush()


def main(argv: list[str]) -> None:
    path, nr = argv[0], int(argv[1])
    spin = len(argv) > 2 and argv[2] == "spin"
    accel = argv[3] if len(argv) > 3 else "KVM"
    tids: dict[int, int] = {}
    for i in range(nr):
        ready = threading.Event()
        threading.Thread(target=_vcpu_thread, args=(i, accel, spin, tids, ready),
                         daemon=True).start()
        ready.wait()
    for i in range(int(os.environ.get("STANDIN_IOTHREADS") or 0)):
        ready = threading.Event()
        threading.Thread(target=_iothread, args=(i, ready), daemon=True).start()
        ready.wait()
    # STANDIN_NO_QUERY: act like a QEMU whose query-cpus-fast fails, forcing the name fallback
    served = {} if os.environ.get("STANDIN_NO_QUERY") else tids
    HOTPLUG.update(accel=accel, spin=spin, all=tids)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    print(f"ready {os.getpid()}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_qmp, args=(conn, served), daemon=True).start()


class Standin:
    """Handle on a running stand-in process, for tests."""

    def __init__(self, qmp: str, nr_vcpus: int = 2, mode: str = "sleep",
                 accel: str = "KVM", no_query: bool = False, iothreads: int = 0) -> None:
        env = dict(os.environ, STANDIN_NO_QUERY="1" if no_query else "",
                   STANDIN_IOTHREADS=str(iothreads) if iothreads else "")
        self.qmp = qmp
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), qmp, str(nr_vcpus), mode, accel],
            stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        assert line.startswith("ready "), f"stand-in failed to start: {line!r}"
        self.pid = self.proc.pid
        self.tids = {}
        self.iothreads: dict[str, int] = {}  # iothread id -> tid
        self._scan()

    def _scan(self) -> None:
        """Note the vCPU and I/O threads by name. A QMP connection's thread may exit
        between listing and reading its name; it is neither, so it is skipped."""
        for entry in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{entry}/comm") as f:
                    name = f.read().strip()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if name.startswith("CPU "):
                self.tids[int(name.split()[1].split("/")[0])] = int(entry)
            elif name.startswith("IO "):
                self.iothreads[name[3:]] = int(entry)

    def hotplug(self) -> int:
        """Plug a vCPU (QMP device_add, as for real QEMU): its index, once its thread runs."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, s.makefile("rwb") as f:
            s.connect(self.qmp)
            f.readline()
            for cmd in ({"execute": "qmp_capabilities"},
                        {"execute": "device_add", "arguments": {"driver": "qemu64-x86_64-cpu"}}):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                assert "return" in json.loads(f.readline()), cmd
        self._scan()
        return max(self.tids)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def policy(tid: int) -> tuple[int, int]:
    """A thread's scheduling policy (without the SCHED_RESET_ON_FORK flag, which the host
    sets on what it boosts) and RT priority, read back from the kernel."""
    return os.sched_getscheduler(tid) & 0xFF, os.sched_getparam(tid).sched_priority


def seconds_until_reverted(tid: int, limit: float = 3.0) -> float:
    """How long until the thread is back at SCHED_OTHER 0; `limit` or more if never."""
    start = time.monotonic()
    while policy(tid) != (os.SCHED_OTHER, 0) and time.monotonic() - start < limit:
        time.sleep(0.005)
    return time.monotonic() - start if policy(tid) == (os.SCHED_OTHER, 0) else limit


def pump(link, seconds, until=None):
    """Run a guest link's event loop for a while (or until `until()` holds); links
    without an fd (the region) are only ticked."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = time.monotonic()
        deadline = link.tick(now)
        if until is not None and until():
            return True
        fd = link.fileno()
        wait = max(0.0, min(end, deadline if deadline is not None else end) - now)
        ready = select.select([fd], [], [], min(wait, 0.05))[0] if fd is not None else []
        if ready:
            link.on_readable(time.monotonic())
        elif fd is None:
            time.sleep(min(wait, 0.05))
    return until() if until is not None else True


@contextlib.contextmanager
def ticking(link: Any) -> Iterator[None]:
    """Keep a guest link's heartbeat going, in a thread, while the test looks elsewhere."""
    stopped = threading.Event()
    ticker = threading.Thread(target=pump, args=(link, 60.0, stopped.is_set))
    ticker.start()
    try:
        yield
    finally:
        stopped.set()
        ticker.join()


class MainLoopThread:
    """A real thread that, when told, creates a thread and reports that thread's policy,
    RT priority and nice, as QEMU's main loop creates worker threads while it runs. The
    worker stays until close() when `keep` (it then holds its cgroup as it is)."""

    def __init__(self, keep: bool = False) -> None:
        self.go = threading.Event()
        self.done = threading.Event()
        self.stop = threading.Event()
        self.child: tuple[int, int, int] | None = None
        ready = threading.Event()

        def child() -> None:
            tid = threading.get_native_id()
            self.child_tid = tid
            self.child = (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority,
                          os.getpriority(os.PRIO_PROCESS, tid))
            if keep:
                self.stop.wait(30)

        def body() -> None:
            self.tid = threading.get_native_id()
            ready.set()
            self.go.wait(30)
            t = threading.Thread(target=child)
            t.start()
            while self.child is None and t.is_alive():
                time.sleep(0.001)
            self.done.set()
            self.stop.wait(30)
            t.join(30)

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
        ready.wait(30)

    def spawn(self) -> tuple[int, int, int] | None:
        self.go.set()
        self.done.wait(30)
        return self.child

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


if __name__ == "__main__":
    main(sys.argv[1:])
