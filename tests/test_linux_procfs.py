"""procfs's named stat fields against real /proc, and what the host side may import."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import threading

import guestagent.host
from guestagent.linux.procfs import parse_stat

# Fields after comm, indexed from state (field 3 in man 5 proc) as 0: utime 11, stime 12,
# nice 16, starttime 19 (field 22), processor 36, rt_priority 37, policy 38.
_AFTER = ["0"] * 49
_AFTER[0], _AFTER[11], _AFTER[12], _AFTER[16], _AFTER[19], _AFTER[36], _AFTER[38] = \
    "R", "5", "6", "-3", "7", "1", "3"
TAIL = (" " + " ".join(_AFTER) + "\n").encode()


def test_named_fields_of_a_hostile_comm():
    stat = parse_stat(b"42 (a) R 1 2 (x\n) y)" + TAIL)
    assert stat.comm == "a) R 1 2 (x\n) y"
    assert (stat.state, stat.cpu_ticks, stat.nice, stat.start_time, stat.last_cpu,
            stat.policy) == ("R", 11, -3, 7, 1, 3)


def test_start_time_and_cpu_of_a_live_thread_match_the_kernel():
    # A thread started after this process has a start time no earlier than the process's.
    ready, done = threading.Event(), threading.Event()
    tids: list[int] = []

    def body() -> None:
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(60)

    t = threading.Thread(target=body)
    t.start()
    try:
        assert ready.wait(60)
        with open(f"/proc/{os.getpid()}/stat", "rb") as f:
            proc = parse_stat(f.read())
        with open(f"/proc/{os.getpid()}/task/{tids[0]}/stat", "rb") as f:
            thread = parse_stat(f.read())
    finally:
        done.set()
        t.join()
    assert 0 < proc.start_time <= thread.start_time
    assert thread.last_cpu in os.sched_getaffinity(0)
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        assert int(f.read().rsplit(b")", 1)[1].split()[19]) == proc.start_time


def test_host_side_imports_neither_the_observer_nor_the_agent():
    # The host service shares protocol, transport and plumbing, never the guest's daemon.
    modules = ["guestagent.host.cli"] + [
        f"guestagent.host.{m.name}" for m in pkgutil.iter_modules(guestagent.host.__path__)]
    code = ("import sys\n"
            f"for m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['guestagent', 'observe'], ['guestagent', 'agent'])))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.strip() == "[]"
    assert "guestagent.host.peer" in modules and "guestagent.host.capacity" in modules
