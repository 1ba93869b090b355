"""`guestagent-host serve`: the wiring and the loop of the host service.

Finds VMs (libvirt status files, drop-ins), attaches a HostPeer to each that
has a hints transport, runs the HostService rounds on one event loop with every
link's fd, the status socket and the directory watches, writes the Prometheus
textfile, talks to systemd (READY, WATCHDOG, STATUS), and on SIGTERM/SIGINT
restores every thread and cgroup it changed. SIGHUP rescans (and re-reads the
drop-ins).
"""

from __future__ import annotations

import fnmatch
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guestagent.errors import GuestagentError
from guestagent.host import dropins, libvirt
from guestagent.host.applier import ThreadApplier
from guestagent.host.arbiter import EMULATOR, ThreadKey
from guestagent.host.cgroup import (
    CgroupFs,
    CgroupGranter,
    CgroupJournal,
    decode_record,
    restore_record,
)
from guestagent.host.dirwatch import DirWatch
from guestagent.host.discovery import (
    VcpuThread,
    checked_threads,
    discover,
    iothread_tids,
    thread_names,
    thread_start_time,
    vcpus_from_names,
)
from guestagent.host.hostlog import NOTICE, WARNING, HostLog
from guestagent.host.links import open_host_link
from guestagent.host.peer import HostPeer
from guestagent.host.service import HostService, VmEntry
from guestagent.host.serviceconfig import ServiceSettings
from guestagent.host.statefile import RESTORED, ensure_state_dir, process_id, restore_leftovers
from guestagent.host.status import answer, status_document
from guestagent.host.textfile import ThreadMetrics, VmMetrics, render, write_textfile
from guestagent.host.undo import MAX_IOTHREADS, iothread_index, thread_label
from guestagent.host.vms import VmDescription
from guestagent.linux.loop import Loop
from guestagent.linux.sdnotify import Notifier

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class ServeOptions:
    settings: ServiceSettings
    state_dir: str
    status_socket: str | None
    dry_run: bool = False
    verbose: bool = False


def vcpu_threads(desc: VmDescription) -> tuple[int, dict[int, int]]:
    """(QEMU pid, vCPU -> tid) for a VM: libvirt's list, else QMP, else thread names."""
    if desc.vcpus and desc.pid:
        return desc.pid, desc.vcpu_tids()
    if desc.qmp is not None:
        pid, threads = discover(desc.qmp, desc.pid)
        return pid, {t.vcpu: t.tid for t in threads}
    if desc.pid is None:
        raise GuestagentError("no QEMU pid")
    return desc.pid, vcpus_from_names(thread_names(desc.pid))


def iothread_threads(desc: VmDescription, pid: int) -> tuple[VcpuThread, ...]:
    """The VM's iothreads (libvirt's and a drop-in's are named by their QEMU object ids),
    found by QMP or by QEMU's thread names `IO ID`, that are threads of its QEMU."""
    if not desc.iothread_ids:
        return ()
    found = iothread_tids(desc.qmp, pid, desc.iothread_ids)
    tids = [found[i] for i in desc.iothread_ids if i in found]
    out = []
    for n, tid in enumerate(tids[:MAX_IOTHREADS]):
        start = thread_start_time(pid, tid)
        if start is not None and tid != pid:
            out.append(VcpuThread(iothread_index(n), tid, start))
    return tuple(out)


def make_attach(opts: ServeOptions, log: HostLog, restore_before_attach: Any):
    """The service's attach function: threads found and checked, leftovers of a killed
    service restored first, the emulator thread recorded beside the vCPUs."""
    limits = opts.settings.limits
    pin_cpus = limits.pin_cpus if limits.pin_cpus is not None else frozenset(
        os.sched_getaffinity(0))

    def attach(desc: VmDescription) -> HostPeer:
        pid, tids = vcpu_threads(desc)
        if not tids:
            raise GuestagentError(f"QEMU pid {pid} has no vCPU threads (yet)")
        threads = checked_threads(pid, tids)
        start = thread_start_time(pid, pid)
        if start is None:
            raise GuestagentError(f"QEMU pid {pid} exited")
        emulator = (VcpuThread(EMULATOR, pid, start),) + iothread_threads(desc, pid)
        journal = restore_before_attach(opts.state_dir, pid, opts.dry_run,
                                        lambda msg: log(msg))
        applier = ThreadApplier(pid, threads + emulator, opts.dry_run, log, journal)
        link = open_host_link(desc.channel, desc.region, desc.channel_listen,
                              limits.heartbeat_period)
        return HostPeer(applier, limits, pin_cpus, link, log)

    return attach


def find_vms(settings: ServiceSettings) -> tuple[dict[str, VmDescription], tuple[str, ...]]:
    found: dict[str, VmDescription] = {}
    errors: list[str] = []
    for result in (libvirt.scan(settings.libvirt_status_dir), dropins.scan(settings.dropin_dir)):
        errors += result.errors
        for vm in result.vms:
            if vm.name.startswith("dropin:") or any(
                    fnmatch.fnmatchcase(vm.name.split(":", 1)[1], p)
                    for p in settings.libvirt_domains):
                found[vm.name] = vm
    return found, tuple(errors)


def follow_hotplug(service: HostService, found: dict[str, VmDescription]) -> None:
    """Drop-in VMs name no vCPU threads: a changed set of `CPU n/...` threads is a
    hot-plug, which the service follows by attaching again."""
    for name, desc in list(found.items()):
        entry = service.vms.get(name)
        if desc.vcpus or entry is None or entry.peer is None or desc.pid is None and \
                desc.qmp is None:
            continue
        try:
            names = vcpus_from_names(thread_names(entry.peer.applier.pid))
        except GuestagentError:
            continue
        known = {v: t for v, t in entry.peer.applier.tids().items() if v >= 0}
        if names and names != known:
            found[name] = VmDescription(**{**desc.__dict__, "vcpus": tuple(sorted(
                names.items())), "pid": entry.peer.applier.pid})
            if entry.desc.vcpus != found[name].vcpus:
                service.log(f"{name}: vCPU threads changed ({len(known)} -> {len(names)})",
                            NOTICE)
        elif entry.desc.vcpus:
            found[name] = entry.desc  # unchanged: keep what it was attached with


# --- status and metrics ------------------------------------------------------------------


def vm_document(name: str, e: VmEntry, service: HostService, now: float) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name, "source": e.desc.source, "transport": e.desc.transport(),
        "accel": e.desc.accel, "served": e.peer is not None, "error": e.error,
        "emulator_policy": e.emulator, "rt_trap": e.trap,
        "cgroups_granted": sorted(e.cgroups),
    }
    if e.peer is None:
        return doc
    doc.update(status_document(e.peer.snapshot(now)))
    refused = e.peer.applier.refused
    for v in doc["vcpus"]:
        key = ThreadKey(name, v["vcpu"])
        b = service.budgets.get(key)
        v["budget_left"] = round(b.remaining, 3) if b else service.limits.budget
        v["boosted_seconds"] = round(b.boosted_seconds, 3) if b else 0.0
        v["budget_exhaustions"] = b.exhaustions if b else 0
        v["verdict"] = e.verdicts.get(v["vcpu"])
        v["clamps"] = e.peer.clamps.get(v["vcpu"], 0)
        v["eperm"] = refused.get(v["vcpu"], 0)
    applier = e.peer.applier
    tids = applier.tids()
    for index in sorted((i for i in applier.originals if i < 0), reverse=True):
        b = service.budgets.get(ThreadKey(name, index))
        cur = applier.current[index]
        thread = {
            "tid": tids.get(index), "policy": cur.describe().split(" cpus ")[0],
            "boosted": cur.is_rt and not applier.originals[index].is_rt,
            "verdict": e.verdicts.get(index),
            "budget_left": round(b.remaining, 3) if b else service.limits.budget,
            "boosted_seconds": round(b.boosted_seconds, 3) if b else 0.0,
            "budget_exhaustions": b.exhaustions if b else 0,
            "eperm": refused.get(index, 0),
        }
        if index == EMULATOR:
            doc["emulator"] = thread
        else:
            doc.setdefault("iothreads", []).append({"name": thread_label(index), **thread})
    return doc


def service_document(service: HostService, now: float) -> dict[str, Any]:
    lim = service.limits.resolved(service.pcpus)
    boosted = sorted(f"{k.vm}:{thread_label(k.index)}" for k in service.held)
    return {
        "service": True,
        "limits": {"max_boosted_per_cpu": lim.per_cpu, "max_boosted": lim.host,
                   "max_boosted_per_vm": lim.per_vm, "boost_budget": lim.budget,
                   "boost_share": lim.share,
                   "pcpus": sorted(service.pcpus)},
        "boosted": boosted,
        "vms": [vm_document(n, e, service, now) for n, e in sorted(service.vms.items())],
    }


def format_service(doc: Mapping[str, Any]) -> str:
    from guestagent.host.status import format_status

    lim = doc.get("limits", {})
    lines = [f"{len(doc.get('vms', []))} VMs  boosted {len(doc.get('boosted', []))}/"
             f"{lim.get('max_boosted')} (per CPU {lim.get('max_boosted_per_cpu')}, per VM "
             f"{lim.get('max_boosted_per_vm')})  budget {lim.get('boost_budget')} s, "
             f"share {lim.get('boost_share')}"]
    for vm in doc.get("vms", []):
        lines.append("")
        head = f"{vm['name']}  {vm.get('transport')}  {vm.get('accel')}"
        if not vm.get("served"):
            lines.append(f"{head}  not served: {vm.get('error') or '-'}")
            continue
        lines.append(f"{head}  emulator {vm.get('emulator_policy')}")
        if vm.get("rt_trap"):
            lines.append(f"  RT trap: {vm['rt_trap']}")
        lines += ["  " + line for line in format_status(vm).splitlines()]
        lines.append(f"  {'VCPU':>4} {'VERDICT':<16} {'BUDGET':>7} {'BOOSTED':>9} "
                     f"{'SPENT':>5} {'CLAMPS':>6} {'EPERM':>5}")
        rows = [(str(v["vcpu"]), v) for v in vm.get("vcpus", [])]
        if vm.get("emulator"):
            rows.append(("emu", vm["emulator"]))
        rows += [(f"io{t['name'][len('iothread'):]}", t) for t in vm.get("iothreads", [])]
        for label, v in rows:
            lines.append(f"  {label:>4} {v.get('verdict') or '-':<16} "
                         f"{v.get('budget_left', 0):>6.3f}s {v.get('boosted_seconds', 0):>8.1f}s "
                         f"{v.get('budget_exhaustions', 0):>5} {v.get('clamps', 0):>6} "
                         f"{v.get('eperm', 0):>5}")
    return "\n".join(lines)


def metrics_text(service: HostService) -> str:
    threads, vms = [], []
    for name, e in sorted(service.vms.items()):
        vms.append(VmMetrics(name, e.peer is not None,
                             e.peer.counters.get("lease_expiries", 0) if e.peer else 0))
        if e.peer is None:
            continue
        for index in sorted(e.peer.applier.originals):
            b = service.budgets.get(ThreadKey(name, index))
            threads.append(ThreadMetrics(
                name, thread_label(index),
                b.boosted_seconds if b else 0.0, b.exhaustions if b else 0,
                e.peer.clamps.get(index, 0), e.peer.applier.refused.get(index, 0)))
    return render(threads, vms)


# --- the loop ----------------------------------------------------------------------------


def restore_cgroup_leftovers(state_dir: str, log: HostLog) -> dict[str, int]:
    """A killed service's cgroup grants, put back before anything else. Returns the
    originals the kernel would not take back yet (a real-time thread is still in the
    cgroup); they stay in the journal, for the next service to adopt or the next
    `restore` to retry."""
    from guestagent.host.cgroup import JOURNAL_NAME

    path = os.path.join(state_dir, JOURNAL_NAME)
    if not os.path.exists(path):
        return {}
    fs = CgroupFs.find()
    try:
        with open(path, "rb") as f:
            record = decode_record(f.read(1 << 20))
    except (OSError, ValueError) as err:
        raise GuestagentError(f"{path}: refused, left in place: {err}") from None
    if process_id(record.owner.pid) == record.owner:
        raise GuestagentError(f"{path}: in use by the running guestagent-host pid "
                              f"{record.owner.pid}")
    if fs is None:
        os.unlink(path)
        return {}
    result = restore_record(fs, record)
    for line in result.lines:
        log(line, WARNING if "cannot" in line else NOTICE)
    left = {c: v for c, v in record.originals.items() if c in result.failed}
    if left:
        log(f"{path}: kept: {len(left)} cgroup runtimes could not be restored yet", WARNING)
    else:
        os.unlink(path)
    return left


def serve(opts: ServeOptions, restore_before_attach: Any) -> int:
    settings = opts.settings
    log = HostLog(opts.verbose or opts.dry_run)
    me = process_id(os.getpid())
    cgroups = CgroupFs.find()
    granter = None
    inherited: dict[str, int] = {}
    if not opts.dry_run:
        # What a killed service left: every VM's threads, then the cgroup runtimes (the
        # kernel refuses to take RT runtime from a cgroup with an RT thread in it).
        ensure_state_dir(opts.state_dir)
        for outcome in restore_leftovers(opts.state_dir, False):
            for line in outcome.lines:
                log(line, NOTICE if outcome.result == RESTORED else WARNING)
        inherited = restore_cgroup_leftovers(opts.state_dir, log)
    if cgroups is not None and settings.rt_cgroup_budget_us and not opts.dry_run and me:
        granter = CgroupGranter(cgroups, CgroupJournal(opts.state_dir, me, inherited),
                                settings.rt_cgroup_per_thread_us, settings.rt_cgroup_budget_us)
    pcpus = frozenset(os.sched_getaffinity(0))
    service = HostService(make_attach(opts, log, restore_before_attach), settings.arbiter,
                          pcpus, settings.emulator_policy, log, cgroups, granter)
    notifier = Notifier()
    watches = [DirWatch(settings.libvirt_status_dir), DirWatch(settings.dropin_dir)]
    status = None
    if opts.status_socket:
        from guestagent.host.status import listen
        status = listen(opts.status_socket)
    stop: list[int] = []
    rescan = [True]
    loop = Loop(time.monotonic)
    loop.catch(STOP_SIGNALS, stop.append)
    loop.catch((signal.SIGHUP,), lambda _s: rescan.__setitem__(0, True))
    watchdog = _watchdog_interval()
    if status is not None:
        loop.watch("status", status.fileno(), lambda _fd: answer(
            status, service_document(service, time.monotonic())))

    def on_dir(_fd: int) -> None:
        if any(w.drain() for w in watches):
            rescan[0] = True

    loop.follow("dirs", [w.fileno() for w in watches], on_dir)
    links: dict[int, HostPeer] = {}

    def on_link(fd: int) -> None:
        peer = links.get(fd)
        if peer is not None and peer.link is not None:
            peer._link_call("read", lambda: peer.link.on_readable(time.monotonic()))

    ready = False
    log(f"serving VMs from {settings.libvirt_status_dir} and {settings.dropin_dir}"
        + (" (dry run)" if opts.dry_run else ""), NOTICE)
    try:
        while not stop:
            now = time.monotonic()
            if rescan[0] or loop.due("rescan") is None:
                rescan[0] = False
                for w in watches:
                    w.tick()
                found, errors = find_vms(settings)
                follow_hotplug(service, found)
                service.update(found, errors)
                _write_metrics(settings.metrics_textfile, service, log)
                loop.at("rescan", now + settings.rescan_period)
            for name, e in list(service.served()):
                if not e.peer.qemu_alive():
                    service.release(name, f"QEMU pid {e.peer.applier.pid} exited")
            loop.at("step", service.step(now))
            links = {}
            for _, e in service.served():
                fd = e.peer._link_call("fileno", e.peer.link.fileno) if e.peer.link else None
                if fd is not None:
                    links[fd] = e.peer
            loop.follow("links", links, on_link)
            if not ready:
                notifier.ready(f"serving {len(service.served())} of {len(service.vms)} VMs")
                ready = True
            if watchdog and loop.due("watchdog") is None:  # once per interval, not per wake
                notifier.watchdog()
                loop.at("watchdog", now + watchdog)
            loop.wait()
    finally:
        notifier.stopping("restoring threads")
        service.release_all()
        if inherited and granter is None:  # a predecessor's, not adopted: try it again
            try:
                restore_cgroup_leftovers(opts.state_dir, log)
            except GuestagentError as err:
                log(str(err), WARNING)
        for w in watches:
            w.close()
        loop.close()
        _write_metrics(settings.metrics_textfile, service, log)
        if status is not None:
            status.close()  # removes the socket file, if it is still ours
    if stop:
        log(f"stopping on {signal.Signals(stop[0]).name}; threads restored", NOTICE)
    return 0


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


def _write_metrics(path: str, service: HostService, log: HostLog) -> None:
    if not path:
        return
    try:
        write_textfile(path, metrics_text(service))
    except OSError as err:
        log(f"cannot write {path}: {err.strerror or err}", WARNING)

