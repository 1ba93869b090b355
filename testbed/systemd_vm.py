"""Boot a built Debian image (testbed/image.py) with systemd as PID 1 under QEMU.

Unlike ``GuestVM``, which shares the host's root through virtme-ng and runs one
command as init, ``SystemdGuest`` boots the image's own systemd from a virtio
disk, so units, udev rules, journald and cloud-init run as they do for users.
The devices are GuestVM's (hints port, ivshmem region, two QMP sockets, the
command-server port); the command server is the image's baked-in
``guestagent-testbed-ctl.service``. The root disk is a QEMU snapshot overlay
(``snapshot=on``): the cached image is never written, and the overlay is
thrown away when QEMU exits.

The serial console goes to ``workdir/serial.log`` (``console_tail`` shows it).
A watchdog (testbed/watchdog.py) kills QEMU when the guest outlives ``lifetime``
or its kernel reports a vCPU stuck for minutes; every later command then fails at
once with the reason and the console tail.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from guestagent.errors import GuestagentError
from testbed.image import GuestImage, Kernel
from testbed.vm import HINTS_PORT, CommandResult, GuestConfig, GuestVM, VMError, use_kvm
from testbed.watchdog import GuestWatchdog

HINTS_DEVICE_ID = "gahintsport"
# A TCG boot with cloud-init installing takes minutes on a busy machine.
SYSTEMD_GUEST = GuestConfig(boot_timeout=900.0)
# One guest's boot and all its tests: 4-10 minutes here (docs/testing.md), 3x under load.
LIFETIME = 1800.0
HINTS_CHARDEV_ID = "gahints"


@dataclass(frozen=True)
class Disk:
    """An extra virtio disk; ``serial`` names it under /dev/disk/by-id/virtio-<serial>."""

    path: Path
    serial: str
    readonly: bool = False
    snapshot: bool = False  # writes go to a throwaway overlay
    queues: int = 0  # virtio-blk num-queues; 0: QEMU's default
    # False: no MSI-X vectors, so the disk interrupts through a legacy INTx line, whose
    # affinity the guest may set (the kernel manages MSI-X vectors' affinity itself).
    msix: bool = True


def missing_components() -> list[str]:
    return [] if shutil.which("qemu-system-x86_64") else [
        "qemu-system-x86_64 (Debian package qemu-system-x86)"]


def accel() -> str:
    """KVM where it works; otherwise TCG with one host thread for all vCPUs.

    Multi-threaded TCG live-locked the stock guest's vCPUs in kernel text patching
    (``text_poke_bp``'s int3 dance as the agent toggles its syscall tracepoints); with
    one TCG thread the vCPUs take turns, so no vCPU runs while another patches code.
    """
    return "kvm" if use_kvm() else "tcg,thread=single"


class SystemdGuest(GuestVM):
    """A running systemd guest; use as a context manager."""

    def __init__(self, image: GuestImage, kernel: Kernel, workdir: os.PathLike,
                 config: GuestConfig = SYSTEMD_GUEST,
                 disks: tuple[Disk, ...] = (), cmdline: str = "",
                 lifetime: float = LIFETIME) -> None:
        super().__init__(workdir, config)
        self.lifetime = lifetime
        self.watchdog: GuestWatchdog | None = None
        self.image = image
        self.kernel = kernel
        self.disks = disks
        self.cmdline = cmdline
        self.serial_log = self.workdir / "serial.log"
        self.boot_seconds: float | None = None  # QEMU start to `is-system-running` done

    def command(self) -> list[str]:
        missing = missing_components()
        if missing:
            raise VMError("cannot boot a guest: missing " + "; ".join(missing))
        cmdline = ("root=/dev/vda rw console=ttyS0,115200 panic=-1 "
                   "systemd.show_status=1 " + self.cmdline).strip()
        cmd = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-no-reboot",
               "-machine", "pc", "-smp", str(self.config.cpus), "-m", self.config.memory,
               "-accel", accel(),
               "-kernel", str(self.kernel.vmlinuz), "-initrd", str(self.kernel.initrd),
               "-append", cmdline,
               "-serial", f"file:{self.serial_log}",
               "-drive", f"file={self.image.root},if=none,id=garoot,format=raw,snapshot=on",
               "-device", "virtio-blk-pci,drive=garoot,serial=garoot"]
        for i, disk in enumerate(self.disks):
            opts = f"file={disk.path},if=none,id=gadisk{i},format=raw"
            opts += ",readonly=on" if disk.readonly else ""
            opts += ",snapshot=on" if disk.snapshot else ""
            dev = f"virtio-blk-pci,drive=gadisk{i},serial={disk.serial}"
            dev += f",num-queues={disk.queues}" if disk.queues else ""
            dev += "" if disk.msix else ",vectors=0"
            cmd += ["-drive", opts, "-device", dev]
        return cmd + self.qemu_opts()

    def _find_qemu_pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid  # QEMU itself, no launcher in between

    def _started(self) -> None:
        assert self._proc is not None
        self.watchdog = GuestWatchdog(self._proc, self.serial_log, self.lifetime).start()

    def _check_watchdog(self) -> None:
        if self.watchdog is not None and self.watchdog.reason is not None:
            raise VMError(f"guest killed by the harness watchdog: {self.watchdog.reason}"
                          f"{self.console_tail()}")

    def boot(self) -> None:
        started = time.monotonic()
        try:
            super().boot()
        except VMError:
            self._check_watchdog()
            raise
        # The command server starts early in multi-user.target; the rest of boot,
        # cloud-init's final stage included, is done when this returns.
        left = max(30.0, self.config.boot_timeout - (time.monotonic() - started))
        state = self.run(["systemctl", "is-system-running", "--wait"], timeout=left)
        if state.stdout.strip() not in ("running", "degraded"):
            raise VMError(f"boot did not finish: {state.stdout.strip()}{self.console_tail()}")
        self.boot_seconds = time.monotonic() - started

    def run(self, argv: Sequence[str], timeout: float = 60.0,
            input: str | None = None) -> CommandResult:
        self._check_watchdog()
        try:
            return super().run(argv, timeout, input)
        except VMError:
            self._check_watchdog()  # the watchdog's reason, not "no reply"
            raise

    def close(self) -> None:
        # The command server's `exit` would only restart the service: stop QEMU instead.
        try:
            if self._qmp is not None and self.alive():
                self._qmp.execute("quit")
        except (VMError, GuestagentError, OSError):
            pass  # QEMU may exit before it replies
        finally:  # QEMU is killed and its files removed whatever happened above
            self._ready = False
            if self.watchdog is not None:
                self.watchdog.stop()
            super().close()

    # -- acting in the guest

    def sh(self, script: str, timeout: float = 120.0, check: bool = True) -> str:
        """Run a shell script as root in the guest; its stdout. check: fail on rc != 0."""
        result = self.run(["sh", "-c", script], timeout=timeout)
        if check and result.rc != 0:
            raise VMError(f"guest: {script!r} exited {result.rc}:\n{result.stdout[-2000:]}"
                          f"\n{result.stderr[-2000:]}")
        return result.stdout

    def wait_until(self, script: str, timeout: float, step: float = 1.0) -> str:
        """Run ``script`` until it exits 0; its stdout. Raises with the last output."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run(["sh", "-c", script], timeout=max(30.0, timeout))
            if result.rc == 0:
                return result.stdout
            if time.monotonic() > deadline:
                raise VMError(f"guest: {script!r} still exits {result.rc} after {timeout:.0f} s:"
                              f"\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
            time.sleep(step)

    # -- hot-plugging the hints port

    def add_hints_port(self) -> None:
        """QMP chardev-add + device_add virtserialport, as a host that offers it later."""
        self.qmp.execute("chardev-add", {"id": HINTS_CHARDEV_ID, "backend": {
            "type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": self.hints_sock}},
                "server": True, "wait": False}}})
        self.qmp.execute("device_add", {"driver": "virtserialport", "bus": "gaserial.0",
                                        "chardev": HINTS_CHARDEV_ID, "name": HINTS_PORT,
                                        "id": HINTS_DEVICE_ID})

    def remove_hints_port(self, device_id: str = HINTS_DEVICE_ID) -> None:
        self.qmp.execute("device_del", {"id": device_id})
        self.wait_until(f"! test -e /dev/virtio-ports/{HINTS_PORT}", timeout=60)
        self.qmp.execute("chardev-remove", {"id": HINTS_CHARDEV_ID})

    # -- diagnosis

    def console_text(self) -> str:
        parts = []
        for path in (self.serial_log, self.console_log):
            try:
                parts.append(path.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(parts)

