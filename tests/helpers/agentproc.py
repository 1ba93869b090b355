"""The agent and the reference host peer as real subprocesses, and real RT threads
for them to see."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from guestagent.agent.control import call
from guestagent.errors import GuestagentError
from helpers.standin import Standin
from helpers.waiting import wait_for

PERIOD = 0.2  # heartbeat period on both sides: short, so leases and tests are quick
HOLD_MS = 400


class RtThread:
    """A real SCHED_FIFO thread pinned to one CPU, sleeping until stopped."""

    def __init__(self, cpu: int, prio: int, name: str = "rt-probe") -> None:
        self.stop_event, ready = threading.Event(), threading.Event()
        self.error: BaseException | None = None

        def body() -> None:
            try:
                tid = threading.get_native_id()
                with open(f"/proc/self/task/{tid}/comm", "w") as f:
                    f.write(name)
                os.sched_setaffinity(0, {cpu})
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
            except BaseException as err:  # reported by the test, not lost in the thread
                self.error = err
            finally:
                ready.set()
            self.stop_event.wait()

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
        ready.wait(5)
        if self.error:
            raise self.error

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)


class Peer:
    """The reference host peer as a subprocess listening on the channel socket."""

    def __init__(self, standin: Standin, chan: str, tmp) -> None:
        cfg = tmp / "host.toml"
        # Guest and host share one kernel here: a stand-in vCPU thread the peer pinned (for
        # a co-location group) stops floating, and the agent would count it as pinned RT
        # work and keep its own boost alive. Pinning is tested on its own elsewhere.
        cfg.write_text(f"heartbeat_period = {PERIOD}\nmax_rt_priority = 40\n"
                       "min_change_interval = 0\ncapacity_period = 0.2\n"
                       "colocation = false\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "guestagent.host.cli", "run", "--qmp", standin.qmp,
             "--channel", chan, "--listen", "--config", str(cfg),
             "--status-socket", str(tmp / "peer-status.sock")],
            stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: os.path.exists(chan), 10), "host peer did not listen"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


def agent_config(tmp_path, chan: str, extra: str = "") -> str:
    path = tmp_path / "guestagent.toml"
    path.write_text(f"""
[agent]
heartbeat_interval_ms = {int(PERIOD * 1000 / 2)}
sweep_interval_ms = 20
cpu_budget_percent = 5
[transport]
mode = "channel"
port_name = "{chan}"
[control]
socket = "{tmp_path / 'control.sock'}"
[policy]
hold_time_ms = {HOLD_MS}
min_change_interval_ms = 0
# Guest and host share one kernel here: the agent would see the stand-in's
# vCPU threads once the peer boosts them, and boost their vCPUs in turn. They
# float over both CPUs; the test's RT threads are pinned.
floating_rt = "ignore"
{extra}""")
    return str(path)


class AgentProcess:
    """`guestagent run` as a subprocess; its log is collected as it comes, so a test can
    wait for a line while the agent keeps running."""

    def __init__(self, config: str, socket_path: str) -> None:
        self.socket = socket_path
        self.proc = subprocess.Popen([sys.executable, "-m", "guestagent", "run",
                                      "--config", config], stderr=subprocess.PIPE, text=True)
        self._log: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        assert wait_for(self.answers, 20), self.fail_text()

    def _collect(self) -> None:
        for line in self.proc.stderr:
            self._log.append(line)

    def log(self) -> str:
        """What the agent logged so far; after it exited, everything it logged."""
        if self.proc.poll() is not None:
            self._reader.join(10)
        return "".join(self._log)

    def logged(self, text: str) -> bool:
        return text in self.log()

    def answers(self) -> bool:
        try:
            call(self.socket, "ping", timeout=1)
            return True
        except GuestagentError:
            return self.proc.poll() is not None

    def ask(self, cmd: str) -> dict:
        return call(self.socket, cmd, timeout=5)

    def link(self) -> str:
        return self.ask("status")["transport"]["link"]

    def fail_text(self) -> str:
        if self.proc.poll() is None:
            return "agent not answering"
        return f"agent exited {self.proc.returncode}: {self.log()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
