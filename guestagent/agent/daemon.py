"""`guestagent run`: the real parts wired to the agent's core, on one event loop.

The loop (``guestagent.linux.loop``) watches the proc connector and the other
observer fds, udev, the link to the host, the control socket and the stop and
reload signals; each turn the core steps (observe, decide, publish, steer) and
says when it must step again. Idle means asleep in poll().
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping

from guestagent import __version__
from guestagent.agent import metrics
from guestagent.agent.config import Config
from guestagent.agent.control import ControlServer
from guestagent.agent.core import RELINK_INTERVAL, AgentCore, Notes, change_share, interest_for
from guestagent.agent.uplink import Uplink
from guestagent.linux.loop import Loop
from guestagent.linux.sdnotify import Notifier
from guestagent.observe import Observer
from guestagent.transport.uevents import UeventMonitor

STOP_FLUSH = 0.5  # how long a stopping agent keeps trying to deliver its last words

__all__ = ["Agent", "interest_for"]

log = logging.getLogger("guestagent")


class Agent:
    """The daemon: builds the observer, the uplink, the control socket and the udev
    monitor, and runs the core on the event loop until SIGTERM or SIGINT."""

    def __init__(self, config: Config, config_path: str | None,
                 clock: Callable[[], float] = time.monotonic,
                 environ: Mapping[str, str] = os.environ) -> None:
        self.clock = clock
        self.notifier = Notifier(environ)
        self.notes = Notes(log)
        observer = Observer(interest=interest_for(config), change_share=change_share(config))
        try:
            self.core = AgentCore(config, observer, Uplink(self.notes, log, Counter()),
                                  self.notes, clock, log, config_path)
            self.control = ControlServer(config.control["socket"], config.control["group"],
                                         self.core.handle)
        except BaseException:
            observer.close()
            raise
        self.devices: UeventMonitor | None = None
        try:
            self.devices = UeventMonitor(("virtio-ports", "pci"))
        except Exception as err:  # pyudev raises assorted errors; polling covers for it
            self.notes(f"device events unavailable ({err}): transports re-checked every "
                       f"{RELINK_INTERVAL:g} s")
        self.stopping = False

    def run(self) -> int:
        loop = Loop(self.clock)
        try:
            return self._run(loop)
        finally:
            loop.close()
            self.close()

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.core.reload_requested = True
        else:
            self.stopping = True

    def _on_devices(self, _fd: int) -> None:
        if self.devices is not None and self.devices.drain():
            self.core.relink_requested = True

    def _on_link(self, _fd: int) -> None:
        link = self.core.uplink.link
        if link is not None:
            link.on_readable(self.clock())

    def _run(self, loop: Loop) -> int:
        core = self.core
        core.wakeups = loop.wakeups
        loop.catch((signal.SIGTERM, signal.SIGINT, signal.SIGHUP), self._on_signal)
        loop.watch("control", self.control.fileno(), lambda _fd: self.control.on_readable())
        if self.devices is not None:
            loop.watch("devices", self.devices.fileno(), self._on_devices)
        now = self.clock()
        core.relink(now)
        core.step(now)
        self.notifier.ready(core.status_line())
        log.info("guestagent %s running: %d vCPUs, %d threads", __version__, core.nr_vcpus,
                 core.snapshot.nr_threads)
        loop.at("metrics", now if core.config.metrics["textfile_dir"] else None)
        loop.at("watchdog", now if self.notifier.watchdog_interval else None)
        followed: dict[str, list[int]] | None = None
        link_fd: int | None = -1  # (no fd yet)
        while not self.stopping:
            now = self.clock()
            for name, when in core.step(now).items():
                loop.at(name, when)
            by_source = core.observer.fds_by_source()
            if by_source is not followed:  # the same dict while the fds stay the same
                followed = by_source
                for source, fds in by_source.items():
                    loop.follow(f"observer:{source}", fds, core.observer.handle_readable)
            link = core.uplink.link
            fd = link.fileno() if link else None
            if fd != link_fd:  # (a reopened channel on the same fd number needs nothing)
                link_fd = fd
                loop.watch("link", fd, self._on_link)
            fired = loop.wait()
            if "watchdog" in fired:
                self.notifier.watchdog()
                self.notifier.status(core.status_line())
                loop.at("watchdog", self.clock() + self.notifier.watchdog_interval)
            if not core.config.metrics["textfile_dir"]:  # (a reload may turn them off or on)
                loop.at("metrics", None)
            elif "metrics" in fired or loop.due("metrics") is None:
                self.write_metrics()
                loop.at("metrics", self.clock() + core.config.metrics["interval_ms"] / 1000.0)
        self.shutdown(self.clock())
        return 0

    def write_metrics(self) -> None:
        core = self.core
        view = core.uplink.view()
        choice = core.uplink.choice
        directory = core.config.metrics["textfile_dir"]
        text = metrics.render(
            core.decision.hints if core.decision else (),
            view.capacity if view else None, core.observer.last_cost, core.sweeps,
            choice.kind if choice else "none", view.link if view else "down",
            core.errors, core.generation)
        try:
            metrics.write_atomically(directory, text)
        except OSError as err:
            core.errors["metrics"] += 1
            self.notes(f"cannot write metrics to {directory}: {err.strerror}")

    def shutdown(self, now: float) -> None:
        """Neutral hints and the stopping state reach the host; steered tasks go back."""
        self.notifier.stopping("stopping: publishing neutral hints")
        self.core.stop(now)
        link = self.core.uplink.link
        if link is not None:
            deadline = now + STOP_FLUSH
            while True:  # a channel may need a few rounds to drain its last lines
                due = link.tick(now)
                if due is None or now >= deadline or due > deadline:
                    break
                time.sleep(min(0.05, max(0.0, due - now)))
                now = self.clock()
        log.info("stopped: neutral hints published")

    def close(self) -> None:
        self.core.uplink.close()
        self.control.close()
        self.core.observer.close()
        if self.devices is not None:
            self.devices.close()
