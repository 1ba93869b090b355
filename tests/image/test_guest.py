"""The package as users get it: Debian 12 guests with systemd as PID 1 and the unit
started by udev, on the stock and the PREEMPT_RT kernel.

The stock guest is a first boot of the cached image: cloud-init installs the .deb
from a local apt repository with the project's user-data. The PREEMPT_RT guest
boots the image with the .deb already installed and the project's vendor-data.
Each guest boots once (tests/image/conftest.py); the tests of each run in file
order and share it, so the destructive ones (stop, upgrade, remove, purge) come
last. Checks for one guest only are parametrised on it alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestagent.errors import GuestagentError
from guestagent.host.status import fetch
from guestagent.protocol import (
    GUEST_CONTROL_OFFSET, GuestControl, PeerState, Request, VcpuHint, check_layout,
    decode_guest_control, decode_guest_slot, decode_header)
from guestagent.transport.seqlock import read_line
from testbed import image as img
from testbed.systemd_vm import SystemdGuest
from testbed.vm import HINTS_PORT

from .conftest import KINDS, REPO_ROOT, Fleet

pytestmark = [pytest.mark.vm, pytest.mark.image]

UNIT = "guestagent.service"
APT = "DEBIAN_FRONTEND=noninteractive apt-get -y -q"
EXAMPLE_CONFIG = (REPO_ROOT / "cloud-init" / "guestagent.toml").read_text()
TESTER = "gatester"  # a user in the guestagent group
OUTSIDER = "gaoutsider"  # a user in no group of note


@pytest.fixture(scope="module", params=KINDS)
def guest(request: pytest.FixtureRequest, fleet: Fleet) -> Iterator[SystemdGuest]:
    vm = fleet.get(request.param)
    # PID 1 at debug level logs every sd_notify message it receives.
    vm.sh("systemd-analyze log-level debug")
    try:
        yield vm
    finally:
        fleet.close(request.param)


def only(kind: str):
    """The test applies to one guest only."""
    return pytest.mark.parametrize("guest", [kind], indirect=True, scope="module")


class HostPeer:
    """`guestagent-host run` from the tree, on the host, against the guest's QMP and region."""

    def __init__(self, vm: SystemdGuest) -> None:
        self.status_socket = str(vm.workdir / "peer.status")
        self.log = vm.workdir / "peer.log"
        with open(self.log, "ab") as out:
            # --dry-run: the peer takes the hints and publishes capacity but leaves
            # QEMU's threads alone on this shared machine (tests/vm covers applying).
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "guestagent.host.cli", "run", "--qmp", vm.peer_qmp_sock,
                 "--region", str(vm.shm_path), "--dry-run", "-v",
                 "--state-dir", str(vm.workdir / "peer-state"),
                 "--status-socket", self.status_socket],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def status(self) -> dict[str, Any] | None:
        """The status document, read from the socket in-process: fast enough to catch
        a state the peer shows for seconds only (a stopping guest, until it is stale)."""
        try:
            return fetch(self.status_socket)
        except GuestagentError:
            return None

    def wait(self, predicate: Any, timeout: float = 120.0, step: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            if doc is not None and predicate(doc):
                return doc
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"host peer: condition not met; last status {doc}\n"
                                     + self.log.read_text(errors="replace")[-3000:])
            time.sleep(step)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def peer(guest: SystemdGuest) -> Iterator[HostPeer]:
    p = HostPeer(guest)
    try:
        yield p
    finally:
        p.stop()


def agent_json(vm: SystemdGuest, *args: str, user: str | None = None) -> dict[str, Any]:
    prefix = ["runuser", "-u", user, "--"] if user else []
    result = vm.run([*prefix, "guestagent", *args, "--json"], timeout=120)
    assert result.rc == 0, f"guestagent {' '.join(args)}: {result.stderr}"
    return json.loads(result.stdout)


def unit_property(vm: SystemdGuest, name: str, unit: str = UNIT) -> str:
    return vm.sh(f"systemctl show -p {name} --value '{unit}'").strip()


def wait_active(vm: SystemdGuest, timeout: float = 180.0) -> int:
    """Wait for the unit to be active (READY=1 seen); its main pid."""
    vm.wait_until(f"systemctl is-active --quiet {UNIT}", timeout)
    return int(unit_property(vm, "MainPID"))


def notifications(vm: SystemdGuest, pid: int) -> list[str]:
    """The sd_notify messages PID 1 logged (at debug level) from that pid."""
    out = vm.sh(f"journalctl -b -o cat --no-pager _PID=1 "
                f"| grep -F 'Got notification message from PID {pid} ' || true")
    return out.splitlines()


# --- first boot: cloud-init and udev ------------------------------------------------------


@only("stock")
def test_cloud_init_installed_configured_and_enabled(guest):
    status = guest.sh("cloud-init status --long", check=False)
    assert "status: done" in status, status
    assert guest.sh("dpkg-query -W -f '${Status} ${Version}' guestagent") == \
        "install ok installed 0.1.0-1"
    assert guest.sh("cat /etc/guestagent/guestagent.toml") == EXAMPLE_CONFIG
    assert guest.sh(f"systemctl is-enabled {UNIT}").strip() == "enabled"
    wait_active(guest)


def boot_journal(vm: SystemdGuest) -> list[str]:
    return vm.sh("journalctl -b -o cat --no-pager _PID=1").splitlines()


@only("rt")
def test_vendor_data_writes_the_config_enables_and_restarts(guest):
    status = guest.sh("cloud-init status --long", check=False)
    assert "status: done" in status, status
    assert guest.sh("cat /etc/guestagent/guestagent.toml") == EXAMPLE_CONFIG
    assert guest.sh(f"systemctl is-enabled {UNIT}").strip() == "enabled"
    wait_active(guest)
    assert agent_json(guest, "status")["config"] == "/etc/guestagent/guestagent.toml"
    starts = [ln for ln in boot_journal(guest) if ln.startswith("Starting guestagent.service")]
    assert len(starts) >= 2, "cloud-init's runcmd did not restart the unit"


@only("rt")
def test_udev_started_the_installed_unit_at_boot(guest):
    """Installed but not enabled in the image, the unit started before cloud-init's
    final stage: udev saw the port at boot."""
    journal = boot_journal(guest)
    first_start = next(i for i, ln in enumerate(journal)
                       if ln.startswith("Starting guestagent.service"))
    final = next(i for i, ln in enumerate(journal) if ln.startswith("Starting cloud-final"))
    assert first_start < final, journal[min(first_start, final):][:40]


def test_cloud_init_found_no_schema_errors(guest):
    """cloud-init checks the config it merged (its own files, the image's and the seed's)
    and only logs a warning: an error here is a key it ignored. `schema --system` checks
    the seed's user-data alone; tests/test_cloudinit.py checks the image's file."""
    warned = guest.sh("grep -h 'Invalid cloud-config' /var/log/cloud-init.log || true")
    assert not warned, warned + guest.sh("cloud-init schema --system --annotate 2>&1 || true")


def rule_wants(vm: SystemdGuest, device: str) -> bool:
    """udev ran the package's rule for the device: its properties name the unit."""
    props = vm.sh(f"udevadm info --query=property '{device}'")
    return f"SYSTEMD_WANTS={UNIT}" in props.split()


def ivshmem_device(vm: SystemdGuest) -> str:
    (path,) = vm.sh("grep -l 0x1110 /sys/bus/pci/devices/*/device").split()
    return os.path.dirname(path)


def test_the_rule_applies_to_the_devices_already_there(guest):
    """On the stock guest the package arrived after the devices: its postinst replays
    their "add", so udev started the unit before cloud-init's runcmd restarted it."""
    assert rule_wants(guest, f"/dev/virtio-ports/{HINTS_PORT}")
    assert rule_wants(guest, ivshmem_device(guest))
    starts = [ln for ln in boot_journal(guest) if ln.startswith("Starting guestagent.service")]
    assert len(starts) >= 2, starts


def test_ready_and_status_reach_systemd(guest):
    guest.sh(f"systemctl restart {UNIT}")
    pid = wait_active(guest)
    assert unit_property(guest, "Type") == "notify"
    messages = guest.wait_until(
        f"journalctl -b -o cat --no-pager _PID=1 | grep -F "
        f"'Got notification message from PID {pid} (READY=1'", timeout=60)
    assert "STATUS=" in messages
    text = unit_property(guest, "StatusText")
    assert re.fullmatch(r"region link \w+; \d of 2 vCPUs boosted", text), text


# --- inside the sandbox ---------------------------------------------------------------------


def test_sandbox_gives_proc_connector_and_tracefs(guest):
    status = agent_json(guest, "status")
    assert status["thread_events"] == "events", status["notes"]
    assert status["sched_events"] is True, status["notes"]
    assert status["pid"] == int(unit_property(guest, "MainPID"))


def test_sandbox_maps_the_ivshmem_bar_read_write(guest):
    """transport ivshmem: the guest formatted the region through the BAR, seen on the host."""
    transport = agent_json(guest, "status")["transport"]
    assert transport["kind"] == "region" and transport["target"] == "ivshmem", transport
    with open(guest.shm_path, "rb") as f:
        head = f.read(4096)
    assert head.strip(b"\0"), "the guest wrote nothing into the ivshmem region"


def test_control_socket_for_root_and_the_group_only(guest):
    mode = guest.sh("stat -c '%U:%G %a' /run/guestagent/control.sock").strip()
    assert mode == "root:guestagent 660"
    guest.sh(f"id {TESTER} >/dev/null 2>&1 || useradd -M -G guestagent {TESTER}; "
             f"id {OUTSIDER} >/dev/null 2>&1 || useradd -M {OUTSIDER}")
    assert agent_json(guest, "status", user=TESTER)["version"]
    denied = guest.run(["runuser", "-u", OUTSIDER, "--", "guestagent", "status"])
    assert denied.rc != 0 and "Traceback" not in denied.stderr
    assert len(denied.stderr.strip().splitlines()) == 1, denied.stderr


def test_host_peer_gets_the_hints_and_the_guest_sees_capacity(guest, peer):
    doc = peer.wait(lambda d: d["link_state"] == "up" and d["generation"] > 0)
    assert len(doc["vcpus"]) == 2 and all(v["hint"] is not None for v in doc["vcpus"])
    deadline = time.monotonic() + 120
    while True:
        cap = agent_json(guest, "capacity")
        if cap["known"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert cap["known"] and [c["vcpu"] for c in cap["vcpus"]] == [0, 1], cap
    assert agent_json(guest, "status")["transport"]["link"] == "up"


# --- what systemd and journald see ---------------------------------------------------------


def test_journal_keeps_the_agents_priorities(guest, tmp_path):
    """An info line at startup; an error when a reload finds a broken config."""
    pid = int(unit_property(guest, "MainPID"))
    conf = "/etc/guestagent/guestagent.toml"
    guest.sh(f"cp {conf} /root/guestagent.toml.good && echo '[policy' >> {conf} && "
             f"systemctl reload {UNIT}")
    try:
        guest.wait_until(f"journalctl -b -u {UNIT} -p err -o cat --no-pager _PID={pid} "
                         "| grep -q 'config not reloaded'", timeout=60)
    finally:
        guest.sh(f"cp /root/guestagent.toml.good {conf} && systemctl reload {UNIT}")
    lines = [json.loads(ln) for ln in guest.sh(
        f"journalctl -b -o json --no-pager _PID={pid}").splitlines()]
    priorities = {int(e["PRIORITY"]) for e in lines}
    assert {3, 6} <= priorities, priorities
    assert all(not e["MESSAGE"].startswith("<") for e in lines if isinstance(e["MESSAGE"], str))


SECURITY = re.compile(r"Overall exposure level for guestagent\.service: (\d+\.\d)")


def test_security_exposure_in_the_guest_is_the_readmes(guest):
    out = guest.sh(f"systemd-analyze security --no-pager {UNIT}", check=False)
    found = SECURITY.search(out)
    assert found, out
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"exposure level {found.group(1)}" in readme, (
        f"README.md should quote the in-guest figure {found.group(1)}")


# --- the port coming and going --------------------------------------------------------------


def test_removing_the_port_is_survived(guest):
    pid = wait_active(guest)
    restarts = unit_property(guest, "NRestarts")
    guest.remove_hints_port()
    guest.sh("udevadm settle")
    assert agent_json(guest, "status")["pid"] == pid
    assert guest.sh(f"systemctl is-active {UNIT}").strip() == "active"
    assert unit_property(guest, "NRestarts") == restarts


def test_a_port_added_later_starts_the_unit(guest):
    """The previous test removed the port; stopped, the unit comes back with the port."""
    guest.sh(f"systemctl stop {UNIT}")
    assert guest.run(["test", "-e", f"/dev/virtio-ports/{HINTS_PORT}"]).rc != 0
    assert guest.sh(f"systemctl is-active {UNIT}", check=False).strip() == "inactive"
    guest.add_hints_port()
    wait_active(guest)
    assert rule_wants(guest, f"/dev/virtio-ports/{HINTS_PORT}")


def test_watchdog_restarts_a_stopped_agent(guest):
    pid = wait_active(guest)
    restarts = int(unit_property(guest, "NRestarts"))
    guest.sh(f"kill -STOP {pid}")
    guest.wait_until(f"test \"$(systemctl show -p NRestarts --value {UNIT})\" -gt {restarts}",
                     timeout=240, step=3)
    assert wait_active(guest) != pid
    assert guest.sh(f"journalctl -b -o cat --no-pager _PID=1 "
                    f"| grep -F '{UNIT}: Watchdog timeout' || true")


# --- PREEMPT_RT -----------------------------------------------------------------------------


def irq_threads(vm: SystemdGuest) -> dict[int, list[tuple[str, str, int]]]:
    """IRQ number -> (comm, policy, rt priority) of each irq/N-* kernel thread, from ps."""
    out = vm.sh("ps -eLo comm=,cls=,rtprio= | grep '^irq/'")
    found: dict[int, list[tuple[str, str, int]]] = {}
    for line in out.splitlines():
        comm, cls, prio = line.rsplit(None, 2)
        number = int(comm[4:].split("-", 1)[0])
        found.setdefault(number, []).append((comm, cls, int(prio)))
    return found


def numbered_irqs(vm: SystemdGuest) -> dict[int, str]:
    """IRQ number -> its actions, from /proc/interrupts (only IRQs with a handler)."""
    out = vm.sh("cat /proc/interrupts")
    ncpus = len(out.splitlines()[0].split())
    irqs = {}
    for line in out.splitlines()[1:]:
        head, _, rest = line.partition(":")
        if head.strip().isdigit():
            fields = rest.split()
            actions = " ".join(fields[ncpus + 2:])
            if actions:
                irqs[int(head)] = actions
    return irqs


@only("rt")
def test_rt_every_irq_is_a_fifo_50_thread(guest):
    assert "PREEMPT_RT" in guest.sh("uname -v")
    threads = irq_threads(guest)
    irqs = numbered_irqs(guest)
    # The timer and the cascade are IRQF_NO_THREAD: they run in hard IRQ context.
    hard = {n for n, actions in irqs.items() if actions in ("timer", "cascade")}
    assert set(irqs) - hard <= set(threads), (irqs, threads)
    for number, entries in threads.items():
        for comm, cls, prio in entries:
            assert (cls, prio) == ("FF", 50), (number, comm, cls, prio)


@only("rt")
def test_rt_irqs_json_links_each_thread_to_its_irq(guest):
    doc = agent_json(guest, "irqs", "--threaded", "--interval", "0")
    linked = {irq["irq"]: {t["comm"] for t in irq["threads"]} for irq in doc["irqs"]}
    for number, entries in irq_threads(guest).items():
        # ps shows the kernel's comm, cut to 15 bytes; the agent names the whole action.
        for comm, _, _ in entries:
            assert any(name.startswith(comm) for name in linked.get(number, ())), \
                (number, comm, linked.get(number))
    for irq in doc["irqs"]:
        for t in irq["threads"]:
            assert t["comm"].startswith(f"irq/{irq['irq']}-")
            assert (t["policy"], t["rt_priority"]) == ("FIFO", 50)


def scratch_irq(vm: SystemdGuest) -> tuple[str, int]:
    """The scratch disk's device node and its IRQ (a legacy INTx line: no MSI-X)."""
    dev = vm.sh("readlink -f /dev/disk/by-id/virtio-gaio").strip()
    virtio = os.path.basename(vm.sh(f"readlink -f /sys/block/{os.path.basename(dev)}/device")
                              .strip())
    (irq,) = [n for n, actions in numbered_irqs(vm).items() if virtio in actions.split(", ")]
    return dev, irq


def vcpu_irq_reasons(vm: SystemdGuest, vcpu: int, irq: int) -> tuple[str, list[str]]:
    hint = agent_json(vm, "hints")["vcpus"][vcpu]
    return hint["request"], [r for r in hint["reasons"] if f"irq/{irq}-" in r]


@pytest.fixture
def frequent_sweeps(guest: SystemdGuest) -> Iterator[None]:
    """The agent with a larger CPU budget, restored afterwards. Under TCG one sweep costs
    about a second of guest CPU, so the default budget (0.4 % of a CPU) spaces sweeps,
    and with them the IRQ rates, minutes apart (seen: 609 s)."""
    conf = "/etc/guestagent/guestagent.toml"
    guest.sh(f"cp {conf} /root/guestagent.toml.before && "
             f"printf '\\n[agent]\\ncpu_budget_percent = 50\\n' >> {conf} && "
             f"systemctl restart {UNIT}")
    try:
        wait_active(guest)
        yield
    finally:
        guest.sh(f"cp /root/guestagent.toml.before {conf} && systemctl restart {UNIT}")


@only("rt")
def test_rt_busy_irq_thread_boosts_its_vcpu_and_idle_ones_do_not(guest, frequent_sweeps):
    dev, irq = scratch_irq(guest)
    vcpu = 1
    guest.sh(f"echo {vcpu} > /proc/irq/{irq}/smp_affinity_list")
    # An IO-APIC line moves when it next fires: read once, then look.
    guest.wait_until(f"dd if={dev} of=/dev/null bs=4k count=1 iflag=direct status=none && "
                     f"test \"$(cat /proc/irq/{irq}/effective_affinity_list)\" = {vcpu}",
                     timeout=60)
    guest.wait_until(f"test -z \"$(guestagent hints --json | grep -F 'irq/{irq}-')\"",
                     timeout=60)
    request, reasons = vcpu_irq_reasons(guest, vcpu, irq)
    assert not reasons, "the idle disk's IRQ thread counted"
    io = guest.spawn(["sh", "-c", f"while :; do dd if={dev} of=/dev/null bs=4k count=2048 "
                                  "iflag=direct status=none; done"])
    try:
        deadline = time.monotonic() + 120
        while True:
            request, reasons = vcpu_irq_reasons(guest, vcpu, irq)
            if (request == "boost" and reasons) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert request == "boost" and reasons, f"vCPU {vcpu} not boosted for its busy IRQ thread"
        assert "fifo 50" in reasons[0]
        assert not vcpu_irq_reasons(guest, 1 - vcpu, irq)[1], "the other vCPU counted it"
    finally:
        guest.signal(io, signal.SIGKILL)
        guest.sh("pkill -x dd || true")
    deadline = time.monotonic() + 120
    while vcpu_irq_reasons(guest, vcpu, irq)[1] and time.monotonic() < deadline:
        time.sleep(1)
    assert not vcpu_irq_reasons(guest, vcpu, irq)[1], "the boost outlived the I/O"


# --- stop, upgrade, remove, purge (last: they change the installation) ---------------------
# On both guests: the stock one's package came from cloud-init, the rt one's was in the
# image, so each path to an installed package is upgraded, removed and purged.


def region_guest_side(path: str) -> tuple[GuestControl, list[tuple[VcpuHint, int]]]:
    """The guest's control line and hint slots, as the host reads the region file."""
    data = Path(path).read_bytes()
    layout = check_layout(decode_header(data), len(data))
    control = decode_guest_control(read_line(data, GUEST_CONTROL_OFFSET))
    return control, [decode_guest_slot(i, read_line(data, layout.guest_slot(i)))
                     for i in range(layout.nr_vcpus)]


def test_stop_publishes_neutral_hints_and_stopping(guest, peer):
    pid = wait_active(guest)
    peer.wait(lambda d: d["link_state"] == "up")
    assert agent_json(guest, "status")["transport"]["kind"] == "region"
    # The peer shows the guest's STOPPING until its heartbeats go stale (5 s): watch
    # while the stop runs rather than after it returns.
    stop = guest.spawn(["systemctl", "stop", UNIT])
    try:
        peer.wait(lambda d: d["guest_state"].lower() == "stopping", timeout=60, step=0.05)
    finally:
        assert guest.wait(stop, timeout=120).rc == 0
    # What the agent left in the region: STOPPING, and neutral hints in every slot (a slot
    # keeps the generation it was last written at: unchanged hints are not rewritten).
    control, slots = region_guest_side(guest.shm_path)
    assert control.state == PeerState.STOPPING
    assert [h.request for h, _ in slots] == [Request.NEUTRAL] * len(slots), slots
    assert all(gen <= control.generation for _, gen in slots), (control, slots)
    # The peer ended the lease: no guest hint is applied any more.
    peer.wait(lambda d: all(v["hint"] is None for v in d["vcpus"]), timeout=60)
    assert any("STOPPING=1" in m for m in notifications(guest, pid))


def test_upgrade_keeps_the_admins_conffile(guest):
    guest.sh(f"systemctl start {UNIT}")
    conf = "/etc/guestagent/guestagent.toml"
    guest.sh(f"echo '# changed by the admin' >> {conf}")
    before = guest.sh(f"cat {conf}")
    guest.sh(f"echo '{img.repo_source('next')}' > /etc/apt/sources.list.d/next.list && "
             f"{APT} update && {APT} install guestagent", timeout=600)
    assert guest.sh("dpkg-query -W -f '${Version}' guestagent") == "0.1.0-2"
    assert guest.sh(f"cat {conf}") == before
    wait_active(guest)


def test_remove_stops_the_unit(guest):
    wait_active(guest)
    guest.sh(f"{APT} remove guestagent", timeout=600)
    assert guest.sh(f"systemctl is-active {UNIT}", check=False).strip() in ("inactive", "failed")
    assert guest.sh("dpkg-query -W -f '${Status}' guestagent") == "deinstall ok config-files"
    assert "changed by the admin" in guest.sh("cat /etc/guestagent/guestagent.toml")


def test_purge_removes_it(guest):
    guest.sh(f"{APT} purge guestagent", timeout=600)
    assert guest.run(["test", "-e", "/etc/guestagent/guestagent.toml"]).rc != 0
    assert guest.run(["dpkg-query", "-W", "guestagent"]).rc != 0
    assert guest.run(["test", "-e", "/lib/systemd/system/guestagent.service"]).rc != 0

