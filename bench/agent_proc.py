"""Shared by the agent benchmarks: `guestagent run` as a subprocess on a local region,
and what /proc says about its CPU time and memory.

The agent publishes to a region file under a temporary directory (transport
mode "local"), with its control socket beside it, so a benchmark never touches
/run/guestagent or a real host transport. Its stderr goes to a file that the
benchmark reads at the end for errors and warnings.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from guestagent.agent.control import call  # noqa: E402
from guestagent.errors import GuestagentError  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Region files live in memory, as ivshmem and /run/guestagent do: on a disk file
# system, writeback write-protects the mapped pages and the next write faults.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
LOG_LINE = re.compile(r"^guestagent: (DEBUG|INFO|WARNING|ERROR|CRITICAL): (.*)$")


def write_config(directory: str, hold_time_ms: int = 2000, min_change_interval_ms: int = 200,
                 log_level: str = "info", extra: str = "") -> str:
    """A config for the local region in ``directory``; the rest stays at its defaults."""
    path = os.path.join(directory, "guestagent.toml")
    with open(path, "w") as f:
        f.write(f"""[agent]
log_level = "{log_level}"
[transport]
mode = "local"
local_region = "{os.path.join(directory, 'region')}"
[control]
socket = "{os.path.join(directory, 'control.sock')}"
[policy]
hold_time_ms = {hold_time_ms}
min_change_interval_ms = {min_change_interval_ms}
{extra}""")
    return path


@dataclass
class Agent:
    """A running `guestagent run`: its process, control socket, region and log."""

    proc: subprocess.Popen
    socket: str
    region: str
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, cmd: str) -> dict:
        return call(self.socket, cmd, timeout=10)

    def status_cli(self) -> dict:
        """`guestagent status --json --socket ...`, as an operator would ask."""
        out = subprocess.run([sys.executable, "-m", "guestagent", "status", "--json",
                              "--socket", self.socket], capture_output=True, text=True,
                             timeout=30, cwd=ROOT)
        if out.returncode != 0:
            raise GuestagentError(f"guestagent status failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def log_lines(self, levels: tuple[str, ...] = ("WARNING", "ERROR", "CRITICAL")) -> list[str]:
        """Lines of the agent's stderr at these levels, and anything that is not a log line."""
        with open(self.log_path, errors="replace") as f:
            lines = f.read().splitlines()
        out = []
        for line in lines:
            m = LOG_LINE.match(line)
            if m is None or m.group(1) in levels:
                out.append(line)
        return out


@contextmanager
def running_agent(hold_time_ms: int = 2000, min_change_interval_ms: int = 200,
                  log_level: str = "info", start_timeout: float = 60.0) -> Iterator[Agent]:
    """Start `guestagent run` on a local region in a temporary directory; SIGTERM at the end."""
    with tempfile.TemporaryDirectory(prefix="ga-bench-", dir=SCRATCH) as tmp:
        config = write_config(tmp, hold_time_ms, min_change_interval_ms, log_level)
        log_path = os.path.join(tmp, "agent.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "guestagent", "run",
                                     "--config", config], stderr=log, stdout=log, cwd=ROOT)
        agent = Agent(proc, os.path.join(tmp, "control.sock"), os.path.join(tmp, "region"),
                      log_path)
        try:
            wait_answering(agent, start_timeout)
            yield agent
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_answering(agent: Agent, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if agent.proc.poll() is not None:
            with open(agent.log_path) as f:
                raise RuntimeError(f"agent exited {agent.proc.returncode}: {f.read()}")
        try:
            agent.ask("ping")
            return
        except GuestagentError:
            time.sleep(0.05)
    raise RuntimeError(f"agent not answering on {agent.socket} after {timeout:g} s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat


def rss_mib(pid: int) -> float:
    """VmRSS from /proc/<pid>/status, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wakeups(pid: int) -> int:
    """Context switches of the agent's main thread so far: one per time it went to sleep."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise RuntimeError(f"no voluntary_ctxt_switches for pid {pid}")


def forks_so_far() -> int:
    """Processes and threads created on the machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("processes "):
                return int(line.split()[1])
    raise RuntimeError("no processes line in /proc/stat")


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "OK" if ok else "MISSED"
