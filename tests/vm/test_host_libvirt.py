"""`guestagent-host serve` against a real libvirtd and real TCG domains.

Two transient libvirt domains boot the host's kernel under TCG: one with the
org.guestagent.hints.0 channel, one with an ivshmem-plain <shmem>; the guest
agent runs inside each (the host's root is shared read-only over 9p). The
service discovers both from libvirt's status files and serves them at once; the
RT cgroup trap that every libvirt cgroup sets here is refused with one clear
line, then granted when configured and restored; SIGTERM restores everything,
and so do `guestagent-host restore` and a restart after SIGKILL. A hostile guest
(FIFO 99 on every vCPU, flapping, with busy vCPUs) stays inside the host cap and
its budget. The daemons are started and stopped here, the shmem files removed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.waiting import wait_for

from guestagent.host.cgroup import CgroupFs
from guestagent.host.service import schedstat_ns
from testbed.libvirt import Domain, Libvirtd, iothread_tids, missing_components, vcpu_tids

pytestmark = [pytest.mark.vm, pytest.mark.root]

RT_TASK = ["taskset", "-c", "1", "chrt", "-f", "50", "sleep", "900"]


def policy(tid: int) -> tuple[int, int]:
    try:
        return os.sched_getscheduler(tid) & 0xFF, os.sched_getparam(tid).sched_priority
    except OSError:
        return (-1, -1)


class Service:
    """`guestagent-host serve` on the host, limited to this module's domains."""

    def __init__(self, workdir: Path, prefix: str, extra: str = "", budget: float = 5.0
                 ) -> None:
        self.workdir = workdir
        self.status = str(workdir / "status.sock")
        self.state = str(workdir / "state")
        self.log = workdir / "serve.log"
        self.metrics = workdir / "host.prom"
        (workdir / "vms.d").mkdir(exist_ok=True)
        cfg = workdir / "host.toml"
        cfg.write_text(f"""\
heartbeat_period = 1.0
lease_periods = 2.0
max_rt_priority = 10
max_boosted = 2
min_change_interval = 0.05
capacity_period = 0.5
[host]
libvirt_domains = ["{prefix}-*"]
dropin_dir = "{workdir / 'vms.d'}"
metrics_textfile = "{self.metrics}"
max_boosted_per_cpu = 3
max_boosted = 6
max_boosted_per_vm = 1
boost_budget = {budget}
rescan_period = 1.0
{extra}""")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "guestagent.host.cli", "serve", "--config", str(cfg),
                 "--status-socket", self.status, "--state-dir", self.state, "-v"],
                stdout=log, stderr=log)

    def doc(self) -> dict[str, Any] | None:
        proc = subprocess.run([sys.executable, "-m", "guestagent.host.cli", "status", "--json",
                               "--status-socket", self.status], capture_output=True, text=True,
                              timeout=30)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def vm(self, name: str) -> dict[str, Any] | None:
        doc = self.doc()
        for vm in (doc or {}).get("vms", []):
            if vm["name"] == f"libvirt:{name}":
                return vm
        return None

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(60)

    def close(self) -> None:
        """After a failure: whatever state it left, undone (as ExecStopPost= would), so
        that no later test (nor the host) inherits a grant or a boost."""
        self.stop(signal.SIGKILL)
        subprocess.run([sys.executable, "-m", "guestagent.host.cli", "restore", "--state-dir",
                        self.state], capture_output=True, timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class Guest:
    def __init__(self, dom: Domain, mode: str) -> None:
        self.dom = dom
        self.mode = mode
        self.agent = dom.start_agent(mode)
        self.tasks: list[int] = []

    def rt_task(self) -> None:
        self.tasks.append(self.dom.spawn(RT_TASK))

    def kill_tasks(self) -> None:
        for pid in self.tasks:
            self.dom.signal(pid, signal.SIGKILL)
        self.tasks.clear()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict[str, Any]]:
    missing = missing_components()
    if missing:
        pytest.skip("libvirt tests need " + "; ".join(missing))
    if CgroupFs.find() is None:
        pytest.skip("needs the cgroup v1 cpu controller with RT group scheduling")
    daemon = Libvirtd()
    doms: list[Domain] = []
    try:
        chan = Domain(channel=True, shmem=False, prefix="ga-lvt", iothreads=1)
        doms.append(chan)
        reg = Domain(channel=False, shmem=True, prefix="ga-lvt")
        doms.append(reg)
        chan.start()
        reg.start()
        guests = {"channel": Guest(chan, "channel"), "region": Guest(reg, "region")}
        yield {"daemon": daemon, "doms": {"channel": chan, "region": reg}, "guests": guests,
               "workdir": tmp_path_factory.mktemp("serve")}
    finally:
        for d in doms:
            d.close()
        daemon.close()


def _threads(dom: Domain) -> list[int]:
    return [dom.pid, *vcpu_tids(dom.pid).values(), *iothread_tids(dom.pid)]


def _all_original(world) -> bool:
    return all(policy(t)[0] == os.SCHED_OTHER for d in world["doms"].values()
               for t in _threads(d))


def _cgroup_runtimes(dom: Domain) -> dict[str, int]:
    fs = CgroupFs.find()
    out = {}
    for tid in _threads(dom):
        cg = fs.thread_cgroup(dom.pid, tid)
        out.update(fs.chain_runtimes(cg))
    return out


def _linked(svc: Service, name: str) -> bool:
    vm = svc.vm(name)
    return bool(vm and vm.get("link_state") == "up" and vm.get("guest_state") == "RUNNING")


def test_serve_finds_both_domains_refuses_rt_in_the_trap_then_grants_and_restores(world):
    doms, guests = world["doms"], world["guests"]
    chan, reg = doms["channel"], doms["region"]
    before = {name: _cgroup_runtimes(d) for name, d in doms.items()}
    fs = CgroupFs.find()
    # The trap: each QEMU thread's own cgroup has no RT runtime.
    assert all(fs.runtime(fs.thread_cgroup(d.pid, t)) == 0 for d in doms.values()
               for t in _threads(d)), before
    workdir = world["workdir"] / "trap"
    workdir.mkdir()
    svc = Service(workdir, "ga-lvt")
    try:
        assert wait_for(lambda: _linked(svc, chan.name) and _linked(svc, reg.name), 180), \
            svc.log_text()
        doc = svc.doc()
        assert {v["transport"] for v in doc["vms"]} == {"channel", "region"}
        for g in guests.values():
            g.rt_task()
        # Refused by the RT cgroup trap: one clear line per VM naming the cgroup, in status.
        assert wait_for(lambda: (svc.vm(chan.name) or {}).get("rt_trap"), 120), svc.log_text()
        vm = svc.vm(chan.name)
        assert "cpu.rt_runtime_us = 0" in vm["rt_trap"] and "/machine" in vm["rt_trap"]
        assert wait_for(lambda: (svc.vm(reg.name) or {}).get("rt_trap"), 60), svc.log_text()
        assert sum("RT" in line and "EPERM" in line for line in svc.log_text().splitlines()
                   if chan.name in line) == 1
        assert any(v["eperm"] >= 1 for v in svc.vm(chan.name)["vcpus"])
        assert _all_original(world)
    finally:
        try:
            assert svc.stop() == 0
        finally:
            svc.close()
    for g in guests.values():
        g.kill_tasks()

    workdir = world["workdir"] / "grant"
    workdir.mkdir()
    svc = Service(workdir, "ga-lvt", "rt_cgroup_budget_us = 400000\n"
                                     "rt_cgroup_per_thread_us = 50000\n")
    try:
        assert wait_for(lambda: _linked(svc, chan.name) and _linked(svc, reg.name), 180), \
            svc.log_text()
        for g in guests.values():
            g.rt_task()
        for d in (chan, reg):
            tid = vcpu_tids(d.pid)[1]
            assert wait_for(lambda t=tid: policy(t) == (os.SCHED_FIFO, 10), 120), \
                svc.log_text()
            # Under TCG the main loop delivers guest timers: it is boosted alongside, and
            # so are the iothreads the domain names.
            assert wait_for(lambda p=d.pid: policy(p)[0] == os.SCHED_FIFO, 30), svc.log_text()
            for io in iothread_tids(d.pid):
                assert wait_for(lambda t=io: policy(t)[0] == os.SCHED_FIFO, 30), svc.log_text()
            assert any(v > 0 for v in _cgroup_runtimes(d).values())
        assert iothread_tids(chan.pid)

        def all_boosted() -> bool:  # a loaded guest may miss a heartbeat: wait for a lease
            vm = svc.vm(chan.name) or {}
            return bool(vm.get("cgroups_granted") and (vm.get("emulator") or {}).get("boosted")
                        and [t["boosted"] for t in vm.get("iothreads", [])] == [True]
                        and "boosted" in vm["vcpus"][1]["applied"]
                        and policy(vcpu_tids(chan.pid)[1])[0] == os.SCHED_FIFO)

        assert wait_for(all_boosted, 120), svc.log_text()
        assert wait_for(lambda: svc.metrics.exists(), 30)
        assert "guestagent_host_boosted_seconds_total" in svc.metrics.read_text()
        # SIGKILL: the boosts stay; `guestagent-host restore` undoes threads and cgroups.
        svc.stop(signal.SIGKILL)
        assert any(policy(t)[0] == os.SCHED_FIFO for t in _threads(chan))
        out = subprocess.run([sys.executable, "-m", "guestagent.host.cli", "restore",
                              "--state-dir", svc.state], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert _all_original(world)
        assert {n: _cgroup_runtimes(d) for n, d in doms.items()} == before
    finally:
        svc.close()

    # A restart serves again; SIGTERM then restores every thread and cgroup.
    workdir = world["workdir"] / "restart"
    workdir.mkdir()
    svc = Service(workdir, "ga-lvt", "rt_cgroup_budget_us = 400000\n")
    try:
        tid = vcpu_tids(chan.pid)[1]
        assert wait_for(lambda: policy(tid)[0] == os.SCHED_FIFO, 180), svc.log_text()
    finally:
        try:
            assert svc.stop() == 0
        finally:
            svc.close()
    assert _all_original(world)
    assert {n: _cgroup_runtimes(d) for n, d in doms.items()} == before
    for g in guests.values():
        g.kill_tasks()


def test_hostile_guest_stays_inside_the_caps_and_budget(world):
    """The guest asks FIFO 99 on every vCPU, one of them flapping, with both vCPUs busy:
    never more boosted vCPUs than its share nor RT threads than the host cap, the priority
    clamped, the budget runs out and is said to the guest (BUDGET_SPENT), and over 30 s
    the vCPUs run at RT no more than the budget's share of the time plus its burst."""
    doms, guests = world["doms"], world["guests"]
    chan = doms["channel"]
    workdir = world["workdir"] / "hostile"
    workdir.mkdir()
    before = {n: _cgroup_runtimes(d) for n, d in doms.items()}
    # Each boosted thread's cgroup gets 15 % of a CPU at RT (150 ms per 1 s period), seven
    # times the budget's share, so that the budget, not the kernel's RT throttling, is
    # what bounds the boosted vCPU.
    budget, share, span = 0.3, 0.02, 30.0
    svc = Service(workdir, "ga-lvt", "rt_cgroup_budget_us = 600000\n"
                                     "rt_cgroup_per_thread_us = 150000\n"
                                     f"boost_share = {share}\n", budget=budget)
    g = guests["channel"]
    try:
        assert wait_for(lambda: _linked(svc, chan.name), 180), svc.log_text()
        # The RT tasks sleep and the busy loops are SCHED_OTHER: the guest's own agent
        # keeps its share of both vCPUs and its heartbeat, while the vCPU threads run
        # flat out on the host whenever they are boosted.
        for cpu in (0, 1):
            g.tasks.append(chan.spawn(["taskset", "-c", str(cpu), "sh", "-c",
                                       "while :; do :; done"]))
        g.tasks.append(chan.spawn(["taskset", "-c", "1", "chrt", "-f", "99", "sleep", "900"]))
        # vCPU 0 flaps: FIFO 99 asked for 1.5 s of every 2.
        g.tasks.append(chan.spawn(["taskset", "-c", "0", "sh", "-c",
                                   "while :; do chrt -f 99 sleep 1.5; sleep 0.5; done"]))
        deadline = time.monotonic() + 240
        most_vcpus = most_rt = 0
        asked_99: set[int] = set()
        spent = False
        first_boost: float | None = None
        rt_run = 0.0  # vCPU run time between two samples that both saw it FIFO
        last: dict[int, tuple[bool, int | None]] = {}
        while time.monotonic() < deadline and not (
                spent and asked_99 == {0, 1} and first_boost is not None
                and time.monotonic() - first_boost >= span):
            rt = [policy(t) for d in doms.values() for t in _threads(d)
                  if policy(t)[0] == os.SCHED_FIFO]
            most_rt = max(most_rt, len(rt))
            tids = vcpu_tids(chan.pid).values()
            vcpus = [t for t in tids if policy(t)[0] == os.SCHED_FIFO]
            most_vcpus = max(most_vcpus, len(vcpus))
            if vcpus and first_boost is None:
                first_boost = time.monotonic()
            for t in tids:
                now_rt, ran = t in vcpus, schedstat_ns(chan.pid, t)
                was_rt, ran_before = last.get(t, (False, None))
                if now_rt and was_rt and ran is not None and ran_before is not None:
                    rt_run += (ran - ran_before) / 1e9
                last[t] = (now_rt, ran)
            assert all(p <= 10 for _, p in rt), rt  # clamped to max_rt_priority
            vm = svc.vm(chan.name) or {}
            for v in vm.get("vcpus", []):
                if (v.get("hint") or {}).get("rt_priority") == 99:
                    asked_99.add(v["vcpu"])
            spent = spent or any("budget_spent" in v.get("applied", [])
                                 for v in vm.get("vcpus", []))
            time.sleep(0.05)
        assert spent, svc.log_text()[-3000:]
        assert asked_99 == {0, 1}, asked_99  # every vCPU asked FIFO 99
        assert most_vcpus == 1  # max_boosted_per_vm = 1
        assert most_rt <= 3  # that vCPU, the emulator thread and the iothread: no more
        vm = svc.vm(chan.name)
        assert any(v["budget_exhaustions"] >= 1 for v in vm["vcpus"])
        # One vCPU boosted at a time, each with its own bucket: two buckets' worth at most,
        # plus a sampling period's worth of slack.
        assert first_boost is not None
        elapsed = time.monotonic() - first_boost
        bound = 2 * (share * elapsed + budget) + 0.1
        assert rt_run <= bound, (rt_run, elapsed, bound)
    finally:
        g.kill_tasks()
        try:
            assert svc.stop() == 0
        finally:
            svc.close()
    assert _all_original(world)
    assert {n: _cgroup_runtimes(d) for n, d in doms.items()} == before
