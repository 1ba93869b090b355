"""Device events: what tells the agent to choose its transport again.

A virtio-serial port or an ivshmem device (PCI) that comes or goes is a
uevent; the observer uses the same monitor for CPU hotplug.
"""

from __future__ import annotations

import os


class UeventMonitor:
    """A pyudev monitor on some subsystems (CPU online/offline, devices coming and
    going). Without udevd it listens to the kernel's own uevents, which carry the
    same add/remove/online/offline actions (but no udev symlinks yet)."""

    def __init__(self, subsystems: tuple[str, ...]) -> None:
        import pyudev

        source = "udev" if os.path.exists("/run/udev/control") else "kernel"
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        for subsystem in subsystems:
            self._monitor.filter_by(subsystem)
        self._monitor.start()
        self.source = source
        self._fd = self._monitor.fileno()  # a libudev call each time: polled every turn

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> int:
        """Consume pending events; returns how many."""
        n = 0
        while self._monitor.poll(timeout=0) is not None:
            n += 1
        return n

    def close(self) -> None:
        # libudev closes the socket when the monitor is released; closing the fd
        # here as well could close an unrelated file that reused the number
        self._monitor = None
