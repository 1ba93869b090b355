"""The guest harness against a real guest kernel: the devices the agent will use exist,
carry bytes both ways, and QEMU's vCPU threads can be found and re-prioritised on the host.

One module-scoped guest serves most tests; one more boot checks the devices can be
turned off and that nothing is left behind.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import sys
import uuid

import pytest
from helpers.vm import require_vm

from testbed.vm import (
    CTL_PORT,
    HINTS_PORT,
    GuestConfig,
    GuestVM,
    SchedState,
    VMError,
    missing_components,
    process_gone,
    sched_state,
    vcpu_threads_from_names,
    vcpu_threads_from_qmp,
)

pytestmark = [pytest.mark.vm, pytest.mark.root]

# Runs in the guest: find the ivshmem device by PCI id through sysfs, as the agent will.
FIND_IVSHMEM = """
import glob, os
def ivshmem():
    for dev in sorted(glob.glob('/sys/bus/pci/devices/*')):
        ids = [open(os.path.join(dev, n)).read().strip() for n in ('vendor', 'device')]
        if ids == ['0x1af4', '0x1110']:
            return dev
    raise SystemExit('no PCI 1af4:1110 device')
"""


def test_missing_components_are_named_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("GUESTAGENT_VM_KERNEL", "/nonexistent/vmlinuz")
    missing = "\n".join(missing_components())
    for name in ("qemu-system-x86_64", "vng", "vmlinuz", "busybox"):
        assert name in missing


def test_guest_boots_a_real_kernel_with_two_vcpus(guest: GuestVM) -> None:
    result = guest.run(["sh", "-c", "uname -r; nproc; cat /proc/cmdline"])
    assert result.rc == 0, result.stderr
    release, nproc, cmdline = result.stdout.splitlines()[:3]
    assert os.path.basename(guest.command()[guest.command().index("--run") + 1]) \
        == f"vmlinuz-{release}"
    assert nproc == "2"
    assert "virtme" in cmdline  # really the guest, not the host answering


def test_spawned_guest_process_can_be_sigkilled(guest: GuestVM) -> None:
    pid = guest.spawn(["sleep", "1000"])
    assert guest.wait(pid, timeout=0.5).rc is None
    guest.signal(pid, signal.SIGKILL)
    assert guest.wait(pid, timeout=30).rc == -signal.SIGKILL


def test_hints_port_has_its_udev_symlink_and_carries_lines_both_ways(guest: GuestVM) -> None:
    nonce = uuid.uuid4().hex
    link = f"/dev/virtio-ports/{HINTS_PORT}"
    result = guest.run(["readlink", "-f", link])
    assert result.rc == 0 and result.stdout.startswith("/dev/vport"), result
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(guest.hints_sock)
    host.settimeout(60)
    # The guest side writes one line and prints the reply it reads back.
    code = (
        "import os, select, sys\n"
        f"fd = os.open({link!r}, os.O_RDWR)\n"
        f"os.write(fd, b'hello {nonce}\\n')\n"
        "buf = b''\n"
        "while not buf.endswith(b'\\n'):\n"
        "    if not select.select([fd], [], [], 60)[0]: sys.exit('no reply')\n"
        "    buf += os.read(fd, 4096)\n"
        "print(buf.decode().strip())\n"
    )
    pid = guest.spawn([sys.executable, "-c", code])
    try:
        got = b""
        while not got.endswith(b"\n"):
            chunk = host.recv(4096)
            assert chunk, "host end closed before the guest's line arrived"
            got += chunk
        assert got == f"hello {nonce}\n".encode()
        host.sendall(f"reply {nonce}\n".encode())
        done = guest.wait(pid, timeout=60)
    finally:
        host.close()
    assert done.rc == 0, done.stderr
    assert done.stdout.strip() == f"reply {nonce}"


def test_ivshmem_region_is_shared_both_ways(guest: GuestVM) -> None:
    assert guest.shm_path is not None
    to_guest, to_host = uuid.uuid4().bytes, uuid.uuid4().bytes
    with open(guest.shm_path, "r+b") as f:
        f.seek(8192)
        f.write(to_guest)
    code = FIND_IVSHMEM + (
        "import mmap, sys\n"
        "dev = ivshmem()\n"
        "with open(dev + '/resource2', 'r+b') as f:\n"
        "    m = mmap.mmap(f.fileno(), 1 << 20)\n"
        "    print(m[8192:8208].hex())\n"
        f"    m[4096:4112] = bytes.fromhex({to_host.hex()!r})\n"
        "    m.flush()\n"
    )
    result = guest.python(code)
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == to_guest.hex()
    with open(guest.shm_path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert m[4096:4112] == to_host
        m.close()


def test_vcpu_threads_found_by_qmp_match_thread_names(guest: GuestVM) -> None:
    by_qmp = vcpu_threads_from_qmp(guest.qmp)
    assert sorted(by_qmp) == [0, 1]
    assert len(set(by_qmp.values())) == 2  # multi-threaded TCG: one host thread per vCPU
    assert guest.qemu_pid is not None
    assert vcpu_threads_from_names(guest.qemu_pid) == by_qmp
    assert guest.vcpu_threads() == by_qmp
    for tid in by_qmp.values():
        assert os.path.exists(f"/proc/{guest.qemu_pid}/task/{tid}")


def _cpu_seconds(pid: int, tid: int) -> float:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_work_pinned_to_guest_vcpu1_runs_on_host_thread_of_vcpu1(guest: GuestVM) -> None:
    # The end-to-end tests rely on this mapping: boosting "vCPU 1" must boost that work.
    threads = guest.vcpu_threads()
    assert guest.qemu_pid is not None
    before = {v: _cpu_seconds(guest.qemu_pid, t) for v, t in threads.items()}
    result = guest.run(["timeout", "4", "taskset", "-c", "1", "sh", "-c", "while :; do :; done"])
    assert result.rc == 124, result  # killed by timeout: it spun the whole time
    spent = {v: _cpu_seconds(guest.qemu_pid, t) - before[v] for v, t in threads.items()}
    assert spent[1] > 0.5 and spent[1] > 2 * spent[0], spent


def test_fifo_set_on_a_vcpu_thread_is_read_back(guest: GuestVM) -> None:
    tid = guest.vcpu_threads()[1]
    original = sched_state(tid)
    assert original.policy == os.SCHED_OTHER
    try:
        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(10))
        assert sched_state(tid) == SchedState(os.SCHED_FIFO, 10)
        # The guest keeps running work on the boosted vCPU.
        assert guest.run(["taskset", "-c", "1", "true"]).rc == 0
    finally:
        os.sched_setscheduler(tid, original.policy, os.sched_param(original.priority))
    assert sched_state(tid) == original


def test_devices_can_be_left_out_and_nothing_is_left_behind(tmp_path) -> None:
    require_vm()
    config = GuestConfig(hints_port=False, ivshmem=False)
    with GuestVM(tmp_path / "vm", config) as vm:
        qemu_pid = vm.qemu_pid
        result = vm.python(FIND_IVSHMEM + (
            "import os\n"
            f"print(os.path.exists('/dev/virtio-ports/{HINTS_PORT}'),"
            f" os.path.exists('/dev/virtio-ports/{CTL_PORT}'))\n"
            "ivshmem()\n"
        ))
        assert result.stdout.split() == ["False", "True"]
        assert result.rc == 1 and "no PCI 1af4:1110" in result.stderr
        assert not os.path.exists(vm.hints_sock)
        sockets = [vm.ctl_sock, vm.qmp_sock]
    assert qemu_pid is not None and process_gone(qemu_pid)
    assert not any(os.path.exists(s) for s in sockets)


def test_failed_boot_kills_qemu_and_removes_files_but_keeps_the_console(tmp_path) -> None:
    require_vm()
    vm = GuestVM(tmp_path / "vm", GuestConfig(boot_timeout=4))  # far too short to boot
    with pytest.raises(VMError, match="not ready after") as err:
        with vm:
            pass
    assert "guest console" in str(err.value)
    assert vm.qemu_pid is not None and vm.shm_path is not None
    assert process_gone(vm.qemu_pid)
    assert not os.path.exists(vm.shm_path)
    assert vm.console_log.stat().st_size > 0
