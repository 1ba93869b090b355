"""Boot a real guest kernel under QEMU for end-to-end tests and benchmarks.

``GuestVM`` boots Debian's kernel through virtme-ng, sharing the host's root
filesystem so this working tree runs inside the guest, with the devices the
agent talks through: the virtio-serial port ``org.guestagent.hints.0`` on a
unix chardev, an ivshmem-plain region backed by a /dev/shm file, and a QMP
socket. A second port, ``org.guestagent.test.ctl``, carries JSON-line commands
to ``guest_ctl.py`` inside the guest, so a test can run and signal guest
processes while it acts on the host.

/dev/kvm on these machines is a nested hypervisor that hangs stock kernels, so
QEMU runs under TCG unless GUESTAGENT_VM_KVM=1 says KVM really works here.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestagent.host.qmp import QmpClient
from guestagent.sched import POLICY_MASK

HINTS_PORT = "org.guestagent.hints.0"
CTL_PORT = "org.guestagent.test.ctl"
IVSHMEM_PCI_ID = ("0x1af4", "0x1110")
GUEST_CTL = Path(__file__).with_name("guest_ctl.py")
REPO_ROOT = Path(__file__).resolve().parents[1]


class VMError(Exception):
    """The guest did not boot or stopped answering; str() ends with the console tail."""


# --- what the machine must have ---------------------------------------------------------


def find_kernel() -> str | None:
    """Debian's kernel image (linux-image-amd64), or GUESTAGENT_VM_KERNEL."""
    override = os.environ.get("GUESTAGENT_VM_KERNEL")
    if override:
        return override if os.path.exists(override) else None
    images = sorted(glob.glob("/boot/vmlinuz-*"), key=os.path.getmtime)
    readable = [p for p in images if os.access(p, os.R_OK)]
    return readable[-1] if readable else None


def _is_static(path: str) -> bool:
    # A static ELF has no PT_INTERP; the string is in the first page of a dynamic one.
    with open(path, "rb") as f:
        head = f.read(4096)
    return head[:4] == b"\x7fELF" and b"ld-linux" not in head


def find_static_busybox() -> str | None:
    """virtme-ng builds an initramfs for a distro kernel and needs a static busybox."""
    for name in ("busybox-static", "busybox.static", "busybox"):
        path = shutil.which(name)
        if path and _is_static(path):
            return path
    return None


def missing_components() -> list[str]:
    """What this machine lacks to boot a test guest, each named exactly."""
    missing = []
    if not shutil.which("qemu-system-x86_64"):
        missing.append("qemu-system-x86_64 (Debian package qemu-system-x86)")
    if not shutil.which("vng"):
        missing.append("vng (PyPI package virtme-ng)")
    if not find_kernel():
        missing.append("a readable /boot/vmlinuz-* (Debian package linux-image-amd64)")
    if not find_static_busybox():
        missing.append("a statically linked busybox (Debian package busybox-static)")
    return missing


def use_kvm() -> bool:
    """Opt-in: /dev/kvm here is a nested hypervisor on which stock kernels hang at boot."""
    return os.environ.get("GUESTAGENT_VM_KVM") == "1" and os.access("/dev/kvm", os.R_OK | os.W_OK)


# --- JSON lines to the guest command server (QMP is guestagent.host.qmp) -----------------


class _JsonLines:
    """A unix-socket JSON-lines connection with a reader thread."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._cond = threading.Condition()
        self._messages: list[dict[str, Any]] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue  # a partial line from before we connected, or guest noise
                if isinstance(msg, dict):
                    with self._cond:
                        self._messages.append(msg)
                        self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall((json.dumps(msg) + "\n").encode())

    def take(self, match: Any, timeout: float) -> dict[str, Any] | None:
        """The first message for which match(msg) holds; None on timeout or close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, msg in enumerate(self._messages):
                    if match(msg):
                        return self._messages.pop(i)
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@dataclass(frozen=True)
class CommandResult:
    rc: int | None  # None: still running (wait with a timeout)
    stdout: str
    stderr: str


class GuestControl:
    """Host end of the guest command server (guest_ctl.py)."""

    def __init__(self, path: str) -> None:
        self._conn = _JsonLines(path)
        self._ids = itertools.count(1)

    def request(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        rid = next(self._ids)
        self._conn.send({"id": rid, "op": op, **fields})
        reply = self._conn.take(lambda m: m.get("id") == rid, timeout)
        if reply is None:
            raise VMError(f"guest command server: no reply to {op} in {timeout} s")
        if "error" in reply:
            raise VMError(f"guest {op}: {reply['error']}")
        return reply

    def wait_ready(self, timeout: float, alive: Any) -> None:
        """Ping until answered: the guest may open its port before or after we connect."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive():
                raise VMError("QEMU exited during boot")
            rid = next(self._ids)
            self._conn.send({"id": rid, "op": "ping"})
            # Replies to earlier pings answer too: any id we sent proves the server is up.
            if self._conn.take(lambda m: isinstance(m.get("id"), int), 2.0) is not None:
                return
        raise VMError(f"guest command server not ready after {timeout:.0f} s")

    def close(self) -> None:
        self._conn.close()


# --- host-side views of the vCPU threads -------------------------------------------------


@dataclass(frozen=True)
class SchedState:
    """A thread's scheduling policy as the kernel reports it."""

    policy: int  # os.SCHED_*, without flag bits
    priority: int


def sched_state(tid: int) -> SchedState:
    # The host service boosts with SCHED_RESET_ON_FORK, which the kernel ORs into the
    # policy it reports; the tests ask which policy, not which flags.
    return SchedState(os.sched_getscheduler(tid) & POLICY_MASK,
                      os.sched_getparam(tid).sched_priority)


def vcpu_threads_from_names(qemu_pid: int) -> dict[int, int]:
    """vCPU index -> host tid from thread names ``CPU n/TCG`` (needs debug-threads=on)."""
    found = {}
    for task in glob.glob(f"/proc/{qemu_pid}/task/*"):
        try:
            with open(f"{task}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # thread exited while we looked
        head, _, accel = comm.partition("/")
        if head.startswith("CPU ") and accel in ("TCG", "KVM") and head[4:].isdigit():
            found[int(head[4:])] = int(os.path.basename(task))
    return found


def vcpu_threads_from_qmp(qmp: QmpClient) -> dict[int, int]:
    """vCPU index -> host tid from QMP ``query-cpus-fast``."""
    return {cpu["cpu-index"]: cpu["thread-id"] for cpu in qmp.execute("query-cpus-fast")}


def process_gone(pid: int) -> bool:
    """No such process, or a zombie: it has exited and its memory is freed."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


# --- the guest ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestConfig:
    cpus: int = 2
    memory: str = "1G"
    hints_port: bool = True  # QEMU listens on hints.sock (server=on,wait=off)
    ivshmem: bool = True
    ivshmem_size: int = 1 << 20
    boot_timeout: float = 300.0  # TCG on a busy 2-core machine: 120 s was not enough under load


class GuestVM:
    """A running guest; use as a context manager. Everything lives under ``workdir``,
    which the guest sees read-write at the same path."""

    def __init__(self, workdir: os.PathLike | None = None,
                 config: GuestConfig = GuestConfig()) -> None:
        self.config = config
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="guestagent-vm-")).resolve()
        self.hints_sock = str(self.workdir / "hints.sock")
        self.ctl_sock = str(self.workdir / "ctl.sock")
        self.qmp_sock = str(self.workdir / "qmp.sock")
        # QEMU serves one client per QMP socket: the harness keeps qmp.sock, the host peer
        # under test gets its own.
        self.peer_qmp_sock = str(self.workdir / "qmp-peer.sock")
        self.console_log = self.workdir / "console.log"
        self.shm_path = (f"/dev/shm/guestagent-vm-{uuid.uuid4().hex[:12]}"
                         if config.ivshmem else None)
        self.qemu_pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._ctl: GuestControl | None = None
        self._qmp: QmpClient | None = None
        self._ready = False  # the command server answered: an orderly power-off can work

    # -- lifecycle

    def qemu_opts(self) -> list[str]:
        opts = [
            "-name", "guestagent-test,debug-threads=on",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-qmp", f"unix:{self.peer_qmp_sock},server=on,wait=off",
            "-device", "virtio-serial-pci,id=gaserial",
            "-chardev", f"socket,id=gactl,path={self.ctl_sock},server=on,wait=off",
            "-device", f"virtserialport,bus=gaserial.0,chardev=gactl,name={CTL_PORT}",
        ]
        if self.config.hints_port:
            opts += [
                "-chardev", f"socket,id=gahints,path={self.hints_sock},server=on,wait=off",
                "-device", ("virtserialport,bus=gaserial.0,chardev=gahints,id=gahintsport,"
                            f"name={HINTS_PORT}"),
            ]
        if self.shm_path:
            opts += [
                "-object", (f"memory-backend-file,id=gashm,share=on,mem-path={self.shm_path},"
                            f"size={self.config.ivshmem_size}"),
                "-device", "ivshmem-plain,memdev=gashm",
            ]
        return opts

    def command(self) -> list[str]:
        missing = missing_components()
        if missing:
            raise VMError("cannot boot a guest: missing " + "; ".join(missing))
        guest_cmd = shlex.join([sys.executable, str(GUEST_CTL), CTL_PORT])
        cmd = ["vng", "--run", str(find_kernel()), "--busybox", str(find_static_busybox()),
               "--cpus", str(self.config.cpus), "--memory", self.config.memory,
               "--force-9p", "--verbose", f"--rwdir={self.workdir}", "--cwd", str(REPO_ROOT),
               "--qemu-opts=" + shlex.join(self.qemu_opts()), "--exec", guest_cmd]
        if not use_kvm():
            cmd.insert(1, "--disable-kvm")
        return cmd

    def __enter__(self) -> GuestVM:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def boot(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.shm_path:
            with open(self.shm_path, "wb") as f:
                f.truncate(self.config.ivshmem_size)
        log = open(self.console_log, "wb")
        try:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(REPO_ROOT), start_new_session=True,  # one group to kill at exit
            )
        finally:
            log.close()
        self._started()
        deadline = time.monotonic() + self.config.boot_timeout
        self._wait_for_socket(self.ctl_sock, deadline)
        self._ctl = GuestControl(self.ctl_sock)
        self._qmp = QmpClient(self.qmp_sock, timeout=10.0)
        self.qemu_pid = self._find_qemu_pid()
        try:
            self._ctl.wait_ready(max(1.0, deadline - time.monotonic()), self.alive)
        except VMError as err:
            raise VMError(f"{err}{self.console_tail()}") from None
        self._ready = True

    def _started(self) -> None:
        """Called once the process is started, before the boot is waited for."""

    def _wait_for_socket(self, path: str, deadline: float) -> None:
        while not os.path.exists(path):
            if not self.alive():
                raise VMError(f"vng exited with {self._proc.returncode} before QEMU started"
                              + self.console_tail())
            if time.monotonic() > deadline:
                raise VMError(f"QEMU did not create {path}" + self.console_tail())
            time.sleep(0.1)

    def _find_qemu_pid(self) -> int:
        # vng forks QEMU; find it among the descendants (psutil is a runtime dependency).
        import psutil

        for child in psutil.Process(self._proc.pid).children(recursive=True):
            try:
                if child.name().startswith("qemu-system"):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        raise VMError("QEMU process not found under vng" + self.console_tail())

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Power off, then make sure every process and file is gone."""
        orderly = False
        if self._ctl is not None and self._ready and self.alive():
            try:
                self._ctl.request("exit", timeout=5)
                orderly = True
            except (VMError, OSError):
                pass
        for client in (self._ctl, self._qmp):
            if client is not None:
                client.close()
        self._ctl = self._qmp = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=20 if orderly else 0)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        if self.qemu_pid is not None:
            _wait_gone(self.qemu_pid, timeout=15)
        if self.shm_path:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass
        for sock in (self.hints_sock, self.ctl_sock, self.qmp_sock, self.peer_qmp_sock):
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- acting in the guest

    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None:
            raise VMError("guest is not running")
        return self._qmp

    def _control(self) -> GuestControl:
        if self._ctl is None:
            raise VMError("guest is not running")
        return self._ctl

    def run(self, argv: Sequence[str], timeout: float = 60.0,
            input: str | None = None) -> CommandResult:
        """Run a command in the guest and wait for it."""
        reply = self._control().request("run", timeout=timeout + 10, argv=list(argv),
                                        timeout_s=timeout, input=input)
        return CommandResult(reply["rc"], reply["stdout"], reply["stderr"])

    def python(self, code: str, timeout: float = 60.0) -> CommandResult:
        """Run Python code in the guest with the host's interpreter (shared root fs)."""
        return self.run([sys.executable, "-c", code], timeout=timeout)

    def spawn(self, argv: Sequence[str], timeout: float = 60.0) -> int:
        """Start a guest process in the background; returns its guest pid."""
        return int(self._control().request("spawn", timeout=timeout, argv=list(argv))["pid"])

    def signal(self, pid: int, signum: int) -> None:
        self._control().request("signal", pid=pid, signum=int(signum))

    def wait(self, pid: int, timeout: float = 60.0) -> CommandResult:
        """Wait for a spawned process; rc is None if it is still running at the timeout."""
        reply = self._control().request("wait", timeout=timeout + 10, pid=pid,
                                        timeout_s=timeout)
        return CommandResult(reply["rc"], reply["stdout"], reply["stderr"])

    # -- host-side views

    def vcpu_threads(self) -> dict[int, int]:
        """vCPU index -> QEMU's host thread id: QMP first, thread names as the fallback."""
        try:
            found = vcpu_threads_from_qmp(self.qmp)
        except VMError:
            found = {}
        if len(found) == self.config.cpus and len(set(found.values())) == len(found):
            return found
        # Single-threaded TCG reports one shared thread-id; names tell them apart if split.
        return vcpu_threads_from_names(self.qemu_pid) if self.qemu_pid else found

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        tail = self.console_text().splitlines()[-lines:]
        return "\n--- guest console (last lines) ---\n" + "\n".join(tail) if tail else ""
