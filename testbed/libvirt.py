"""A real libvirtd and real transient TCG domains, for tests of the host service.

``Libvirtd`` makes sure libvirt's system daemon answers on qemu:///system: on a
machine without systemd (these test machines) it prepares what the minimal
Debian install lacks (the libvirt-qemu user, the state directories) and starts
virtlogd and libvirtd itself, and stops them again on close. A libvirtd that
was already running is used and left running.

``Domain`` is a transient domain created with ``virsh create``: direct kernel
boot of the host's kernel under TCG, the host's root filesystem shared read-only
over 9p so this working tree and the host's Python run in the guest (the
initramfs is virtme-ng's), an ``org.guestagent.hints.0`` channel and/or an
ivshmem-plain ``<shmem>``, and the test command port ``org.guestagent.test.ctl``
served by testbed/guest_ctl.py inside the guest. It is destroyed on close, and
the /dev/shm file libvirt leaves behind is removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from testbed.vm import CTL_PORT, GUEST_CTL, HINTS_PORT, GuestControl, VMError, find_kernel

URI = "qemu:///system"
STATUS_DIR = "/run/libvirt/qemu"
GUEST_PYTHON = "/usr/bin/python3"  # readable by libvirt-qemu, unlike a pyenv under /root
AGENT_CONFIG = """\
[agent]
heartbeat_interval_ms = 250
sweep_interval_ms = 50
cpu_budget_percent = 10
[transport]
mode = "{mode}"
[control]
socket = "/run/guestagent-{mode}.sock"
[policy]
hold_time_ms = 300
"""
REPO_ROOT = Path(__file__).resolve().parents[1]


def _named_threads(pid: int) -> dict[int, str]:
    out = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{entry}/comm") as f:
                out[int(entry)] = f.read().strip()
        except OSError:
            continue  # exited meanwhile
    return out


def vcpu_tids(pid: int) -> dict[int, int]:
    """A TCG QEMU's vCPU threads (`CPU n/TCG`): vCPU index -> tid."""
    return {int(c.split()[1].split("/")[0]): t for t, c in _named_threads(pid).items()
            if c.startswith("CPU ") and c.endswith("/TCG")}


def iothread_tids(pid: int) -> list[int]:
    """A domain's iothreads (<iothreads>): QEMU names them `IO iothreadN` (not
    `IO mon_iothread`, its monitor's)."""
    return sorted(t for t, c in _named_threads(pid).items() if c.startswith("IO iothread"))


def missing_components() -> list[str]:
    """What this machine lacks for libvirt tests, each named exactly."""
    missing = []
    for tool, pkg in (("libvirtd", "libvirt-daemon"), ("virtlogd", "libvirt-daemon"),
                      ("virsh", "libvirt-clients"), ("qemu-system-x86_64", "qemu-system-x86")):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            missing.append(f"{tool} (Debian package {pkg})")
    if not os.path.exists("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/"
                          "libvirt_driver_qemu.so"):
        missing.append("libvirt's QEMU driver (Debian package libvirt-daemon-driver-qemu)")
    if not find_kernel():
        missing.append("a readable /boot/vmlinuz-* (Debian package linux-image-amd64)")
    try:
        import virtme.mkinitramfs  # noqa: F401
    except ImportError:
        missing.append("virtme-ng's initramfs builder (PyPI package virtme-ng)")
    if not os.path.exists(GUEST_PYTHON):
        missing.append(f"{GUEST_PYTHON} for the guest (Debian package python3)")
    if os.geteuid() != 0:
        missing.append("root (libvirtd's system instance)")
    return missing


def _run(argv: Sequence[str], timeout: float = 60.0, check: bool = True
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise VMError(f"{' '.join(argv)}: exit {proc.returncode}: "
                      f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def virsh(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["virsh", "-q", "-c", URI, *args], timeout=timeout, check=check)


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def prepare_host() -> None:
    """What libvirt-daemon-system would have set up (idempotent)."""
    for d in ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu",
              "/run/libvirt"):
        os.makedirs(d, exist_ok=True)
    if _run(["getent", "group", "libvirt"], check=False).returncode != 0:
        _run(["addgroup", "--system", "libvirt"], check=False)
    if _run(["getent", "passwd", "libvirt-qemu"], check=False).returncode != 0:
        _run(["adduser", "--system", "--ingroup", "kvm", "--no-create-home",
              "--home", "/var/lib/libvirt", "libvirt-qemu"])
    # Debian's libvirt runs QEMU as group libvirt-qemu too; without it: "Failed to parse
    # group 'libvirt-qemu'" and the QEMU driver does not start.
    if _run(["getent", "group", "libvirt-qemu"], check=False).returncode != 0:
        _run(["addgroup", "--system", "libvirt-qemu"], check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(pid: int, timeout: float = 30.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class Libvirtd:
    """libvirt's system daemon, answering; started here (and stopped on close) if need be."""

    def __init__(self, timeout: float = 120.0) -> None:
        self._started: list[int] = []
        self._workdir = tempfile.mkdtemp(prefix="guestagent-libvirtd-")
        if self.answers():
            return
        prepare_host()
        if not any(_pid_alive(p) for p in self._pids_of("virtlogd")):
            pidfile = os.path.join(self._workdir, "virtlogd.pid")
            _run([_sbin("virtlogd"), "-d", "-p", pidfile])
            self._wait_pidfile(pidfile)
        pidfile = os.path.join(self._workdir, "libvirtd.pid")
        _run([_sbin("libvirtd"), "-d", "-p", pidfile])
        self._wait_pidfile(pidfile)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline:
                self.close()
                raise VMError(f"libvirtd did not answer on {URI} in {timeout:.0f} s")
            time.sleep(0.5)

    @staticmethod
    def _pids_of(name: str) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/comm") as f:
                        if f.read().strip() == name:
                            found.append(int(entry))
                except OSError:
                    continue
        return found

    def _wait_pidfile(self, path: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid = _read_pid(path)
            if pid is not None:
                self._started.append(pid)
                return
            time.sleep(0.1)
        raise VMError(f"no pid in {path} after 30 s")

    @staticmethod
    def answers() -> bool:
        try:
            return virsh("version", timeout=30, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    @property
    def started_here(self) -> bool:
        return bool(self._started)

    def close(self) -> None:
        for pid in reversed(self._started):  # libvirtd first, then virtlogd
            _stop(pid)
        self._started.clear()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Libvirtd:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def build_initramfs(path: str, kver: str) -> None:
    """virtme-ng's initramfs: loads virtio and 9p modules, mounts the 9p root, runs init=."""
    from virtme import mkinitramfs, modfinder, virtmods

    config = mkinitramfs.Config()
    config.modfiles = modfinder.find_modules_from_install(virtmods.MODALIASES, kver=kver)
    busybox = mkinitramfs.find_busybox("/", True)
    if busybox is None:
        raise VMError("no static busybox (Debian package busybox-static)")
    config.busybox = busybox
    with open(path, "w+b") as f:
        mkinitramfs.mkinitramfs(f, config)


GUEST_INIT = """#!/bin/sh
# PID 1 of a libvirt test guest: the host's root, read-only, with private writable dirs.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# The tree may sit under one of the dirs made private below (a clone in /tmp): hold it
# at /mnt meanwhile and put it back at its own path inside the new tmpfs.
mount --bind {repo} /mnt
for d in /run /tmp /var/tmp /dev/shm /root; do mount -t tmpfs tmpfs "$d"; done
mkdir -p {repo} && mount --move /mnt {repo}
modprobe virtio_console 2>/dev/null
modprobe virtio_pci 2>/dev/null
cd {repo}
export PYTHONPATH={repo} HOME=/root PYTHONDONTWRITEBYTECODE=1
{python} {ctl} {port} > /dev/console 2>&1
echo o > /proc/sysrq-trigger
"""


def _kver(kernel: str) -> str:
    return os.path.basename(kernel).split("vmlinuz-", 1)[-1]


def domain_xml(name: str, kernel: str, initrd: str, init: str, ctl_socket: str,
               channel: str | None, shmem: str | None, console: str,
               vcpus: int = 2, memory_mib: int = 512, iothreads: int = 0) -> str:
    devices = [
        f"<serial type='file'><source path={quoteattr(console)}/><target port='0'/></serial>",
        f"<console type='file'><source path={quoteattr(console)}/>"
        "<target type='serial' port='0'/></console>",
        "<filesystem type='mount' accessmode='passthrough' multidevs='remap'>"
        "<driver type='path'/><source dir='/'/><target dir='/dev/root'/><readonly/>"
        "</filesystem>",
        f"<channel type='unix'><source mode='bind' path={quoteattr(ctl_socket)}/>"
        f"<target type='virtio' name={quoteattr(CTL_PORT)}/></channel>",
    ]
    if channel is not None:
        devices.append(f"<channel type='unix'><source mode='bind' path={quoteattr(channel)}/>"
                       f"<target type='virtio' name={quoteattr(HINTS_PORT)}/></channel>")
    if shmem is not None:
        devices.append(f"<shmem name={quoteattr(shmem)}><model type='ivshmem-plain'/>"
                       "<size unit='M'>1</size></shmem>")
    cmdline = f"console=ttyS0 panic=-1 quiet init={init} virtme_root_mods=1"
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  {f"<iothreads>{iothreads}</iothreads>" if iothreads else ""}
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {chr(10).join('    ' + d for d in devices)}
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Domain:
    """A transient TCG domain running guest_ctl.py; destroyed, and its shmem removed, on close."""

    def __init__(self, channel: bool = True, shmem: bool = False, vcpus: int = 2,
                 memory_mib: int = 512, prefix: str = "ga-test", iothreads: int = 0) -> None:
        kernel = find_kernel()
        if kernel is None:
            raise VMError("no readable /boot/vmlinuz-*")
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        # libvirt chowns <kernel>/<initrd> to libvirt-qemu while the guest runs: use copies.
        self.workdir = tempfile.mkdtemp(prefix=f"guestagent-{self.name}-")
        os.chmod(self.workdir, 0o755)
        self.kernel = os.path.join(self.workdir, "vmlinuz")
        shutil.copyfile(kernel, self.kernel)
        self.initrd = os.path.join(self.workdir, "initrd")
        build_initramfs(self.initrd, _kver(kernel))
        self.init = os.path.join(self.workdir, "init.sh")
        with open(self.init, "w") as f:
            f.write(GUEST_INIT.format(repo=REPO_ROOT, python=GUEST_PYTHON, ctl=GUEST_CTL,
                                      port=CTL_PORT))
        os.chmod(self.init, 0o755)
        self.console = os.path.join(self.workdir, "console.log")
        self.ctl_socket = os.path.join(self.workdir, "ctl.sock")
        self.channel = os.path.join(self.workdir, "hints.sock") if channel else None
        self.shmem = f"{self.name}-hints" if shmem else None
        self.region = f"/dev/shm/{self.shmem}" if shmem else None
        self.xml_path = os.path.join(self.workdir, "domain.xml")
        with open(self.xml_path, "w") as f:
            f.write(domain_xml(self.name, self.kernel, self.initrd, self.init,
                               self.ctl_socket, self.channel, self.shmem, self.console,
                               vcpus, memory_mib, iothreads))
        self._ctl: GuestControl | None = None
        self.created = False

    @property
    def status_file(self) -> str:
        return os.path.join(STATUS_DIR, f"{self.name}.xml")

    def start(self, timeout: float = 600.0) -> Domain:
        """Create the domain and wait until the guest's command server answers."""
        virsh("create", self.xml_path, timeout=120)
        self.created = True
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.ctl_socket):
            if time.monotonic() > deadline:
                raise VMError(f"{self.name}: no {self.ctl_socket}\n{self.console_tail()}")
            time.sleep(0.2)
        self._ctl = GuestControl(self.ctl_socket)
        try:
            self._ctl.wait_ready(max(1.0, deadline - time.monotonic()), self.alive)
        except VMError as err:
            raise VMError(f"{self.name}: {err}\n{self.console_tail()}") from None
        return self

    @property
    def pid(self) -> int | None:
        return _read_pid(os.path.join(STATUS_DIR, f"{self.name}.pid"))

    def alive(self) -> bool:
        pid = self.pid
        return pid is not None and _pid_alive(pid)

    def ctl(self) -> GuestControl:
        if self._ctl is None:
            raise VMError(f"{self.name}: not started")
        return self._ctl

    def run(self, argv: Sequence[str], timeout: float = 120.0) -> dict[str, Any]:
        return self.ctl().request("run", argv=list(argv), timeout_s=timeout,
                                  timeout=timeout + 30)

    def spawn(self, argv: Sequence[str]) -> int:
        return int(self.ctl().request("spawn", argv=list(argv))["pid"])

    def start_agent(self, mode: str) -> int:
        """The guest agent inside, over `mode` ("channel" or "region"), with a fast
        heartbeat; its pid in the guest."""
        config = f"/run/agent-{mode}.toml"  # the guest's /tmp is its own tmpfs
        self.ctl().request("run", argv=["tee", config], timeout_s=30, timeout=60,
                           input=AGENT_CONFIG.format(mode=mode))
        return self.spawn([GUEST_PYTHON, "-m", "guestagent", "run", "--config", config])

    def signal(self, pid: int, signum: int) -> None:
        self.ctl().request("signal", pid=pid, signum=signum)

    def console_tail(self, lines: int = 30) -> str:
        try:
            with open(self.console, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no console log)"

    def destroy(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self.created:
            virsh("destroy", self.name, timeout=60, check=False)
            deadline = time.monotonic() + 60
            while os.path.exists(self.status_file) and time.monotonic() < deadline:
                time.sleep(0.2)
            self.created = False

    def close(self) -> None:
        self.destroy()
        if self.region is not None:  # libvirt does not delete it on destroy
            try:
                os.unlink(self.region)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Domain:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
