"""The `guestagent-host` command line: run the peer beside one VM, show its status, or
restore what a killed peer left boosted."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from guestagent import __version__
from guestagent.cmdline import Parser, dispatch
from guestagent.errors import GuestagentError
from guestagent.host.status import DEFAULT_STATUS_SOCKET
from guestagent.linux.procfs import format_cpulist
from guestagent.protocol.model import CAPACITY_MAX

DEFAULT_STATE_DIR = "/run/guestagent-host"  # state files of the peers, one per VM
DEFAULT_SERVICE_CONFIG = "/etc/guestagent-host/guestagent-host.toml"  # for `serve`

CONTEND_DEFAULT = 0  # a vCPU named by --contend alone is reported as fully contended


def _contend(text: str) -> tuple[int, int]:
    vcpu, eq, cap = text.partition("=")
    try:
        pair = int(vcpu), int(cap) if eq else CONTEND_DEFAULT
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected VCPU or VCPU=CAPACITY, "
                                         "whole numbers") from None
    if pair[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: vCPU numbers start at 0")
    if not 0 <= pair[1] <= CAPACITY_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: capacity must be 0..{CAPACITY_MAX}")
    return pair


def check_run_args(args: argparse.Namespace) -> None:
    """What argparse cannot say: a transport is needed, --listen needs --channel."""
    if args.channel is None and args.region is None:
        raise GuestagentError("run needs a transport: --channel SOCK (virtio-serial) or "
                              "--region FILE (ivshmem)")
    if args.listen and args.channel is None:
        raise GuestagentError("--listen applies to --channel only")
    if args.region is not None and os.path.isdir(args.region):
        raise GuestagentError(f"--region {args.region}: a directory, not a region file "
                              "(QEMU's memory-backend-file mem-path, under /dev/shm)")


def check_against_vm(limits, vcpus: Sequence[int], online: frozenset[int]) -> None:
    """--contend and pin_cpus must name vCPUs this VM has and CPUs this host has online."""
    bad = sorted(set(limits.contend) - set(vcpus))
    if bad:
        raise GuestagentError(f"--contend {bad[0]}: the VM has vCPUs "
                              f"{format_cpulist(frozenset(vcpus)) or 'none'}")
    if limits.pin_cpus is not None:
        off = sorted(limits.pin_cpus - online)
        if off:
            raise GuestagentError(f"pin_cpus: CPU {off[0]} is not online; online CPUs: "
                                  f"{format_cpulist(online)}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="guestagent-host",
        description="Reference host peer: apply a guest's vCPU hints to QEMU's vCPU threads "
                    "within host limits, and publish per-vCPU capacity back.")
    parser.add_argument("--version", action="version", version=f"guestagent-host {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="attach to one VM and serve it until stopped",
                         description="Attach to one VM's vCPU threads and its guestagent link. "
                                     "On exit every changed thread is restored.")
    run.add_argument("--qmp", metavar="SOCK",
                     help="QEMU's QMP unix socket (finds vCPU threads with query-cpus-fast)")
    run.add_argument("--pid", type=int, metavar="PID",
                     help="QEMU's pid: find vCPU threads by name (CPU n/KVM, CPU n/TCG)")
    link = run.add_mutually_exclusive_group()
    link.add_argument("--channel", metavar="SOCK",
                      help="unix socket of the virtio-serial chardev org.guestagent.hints.0")
    link.add_argument("--region", metavar="FILE",
                      help="backing file of the ivshmem-plain region (under /dev/shm)")
    run.add_argument("--listen", action="store_true",
                     help="listen on the --channel socket (QEMU chardev with server=off) "
                          "instead of connecting to QEMU's")
    run.add_argument("--config", metavar="FILE", help="host limits (TOML); defaults if omitted")
    run.add_argument("--dry-run", action="store_true",
                     help="log what would change; touch no thread")
    run.add_argument("--status-socket", metavar="PATH", default=DEFAULT_STATUS_SOCKET,
                     help=f"where `status` finds this peer (default {DEFAULT_STATUS_SOCKET})")
    run.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                     help="where the originals of changed threads are recorded, so they can "
                          f"be restored after a crash (default {DEFAULT_STATE_DIR})")
    run.add_argument("--contend", metavar="VCPU[=CAPACITY]", type=_contend, action="append",
                     default=[], help="report VCPU's capacity as CAPACITY (default "
                                      f"{CONTEND_DEFAULT}) whatever the host load; repeatable")
    run.add_argument("-v", "--verbose", action="store_true", help="log every change")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser(
        "serve", help="serve every VM on the host (libvirt and drop-ins) under one arbiter",
        description="Find every VM: libvirt domains from libvirt's status files, plain QEMU "
                    "VMs from drop-in files (/etc/guestagent-host/vms.d/NAME.toml). Serve each "
                    "that has a hints channel or region; list the others. Host-wide caps and "
                    "boost budgets hold across VMs. On exit every changed thread and cgroup is "
                    "restored; SIGHUP rescans.")
    serve.add_argument("--config", metavar="FILE",
                       help="per-VM limits and a [host] table (TOML; default "
                            f"{DEFAULT_SERVICE_CONFIG} if it exists, else built-in defaults)")
    serve.add_argument("--dry-run", action="store_true",
                       help="log what would change; touch no thread or cgroup")
    serve.add_argument("--status-socket", metavar="PATH", default=DEFAULT_STATUS_SOCKET,
                       help=f"where `status` finds the service (default {DEFAULT_STATUS_SOCKET})")
    serve.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                       help="where originals of changed threads and cgroups are recorded "
                            f"(default {DEFAULT_STATE_DIR})")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every change")
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="show a running peer's per-vCPU state",
                            description="Per vCPU: the guest's hint, the policy applied, the "
                                        "physical CPU, the capacity published, lease state.")
    status.add_argument("--json", action="store_true", help="the full document as JSON")
    status.add_argument("--status-socket", metavar="PATH", default=DEFAULT_STATUS_SOCKET,
                        help=f"the peer's status socket (default {DEFAULT_STATUS_SOCKET})")
    status.set_defaults(func=cmd_status)

    restore = sub.add_parser("restore", help="undo what a killed or crashed peer left applied",
                             description="Put every vCPU thread named in a state file a dead "
                                         "peer left behind back to its recorded settings, "
                                         "then remove the file. Files of running peers are "
                                         "left alone; a file that fails any check is refused "
                                         "and kept.")
    restore.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                         help=f"the peers' state directory (default {DEFAULT_STATE_DIR})")
    restore.add_argument("--dry-run", action="store_true",
                         help="print what would be restored; touch no thread, keep the files")
    restore.set_defaults(func=cmd_restore)
    return parser


def _log_to_stderr(verbose: bool):
    def log(msg: str) -> None:
        if verbose or not msg.startswith("vCPU ") or "cannot" in msg or "asked" in msg:
            print(f"guestagent-host: {msg}", file=sys.stderr, flush=True)
    return log


def _require_root(dry_run: bool) -> None:
    if not dry_run and os.geteuid() != 0:
        raise GuestagentError("changing another process's scheduling needs root "
                              "(or CAP_SYS_NICE); use --dry-run to only log")


def open_link(args: argparse.Namespace, heartbeat_period: float):
    """The transport link the guest uses, or None when neither is given."""
    if args.channel is None and args.region is None:
        return None
    from guestagent.host.links import open_host_link
    return open_host_link(args.channel, args.region, args.listen, heartbeat_period)


def cmd_run(args: argparse.Namespace) -> int:
    from guestagent.host.applier import ThreadApplier
    from guestagent.host.config import load_limits
    from guestagent.host.discovery import discover
    from guestagent.host.peer import HostPeer
    from guestagent.host.status import listen

    check_run_args(args)
    limits = load_limits(args.config)
    if args.contend:
        limits = replace(limits, contend={**limits.contend, **dict(args.contend)})
    _require_root(args.dry_run)
    log = _log_to_stderr(args.verbose or args.dry_run)
    pid, threads = discover(args.qmp, args.pid)
    check_against_vm(limits, [t.vcpu for t in threads], online_cpus())
    pin_cpus = limits.pin_cpus if limits.pin_cpus is not None else frozenset(
        os.sched_getaffinity(0))
    # First undo what a killed peer left, so the originals read next are the real ones.
    journal = restore_before_attach(args.state_dir, pid, args.dry_run, log)
    applier = ThreadApplier(pid, threads, args.dry_run, log, journal)
    log(f"attached to QEMU pid {pid}: " + ", ".join(
        f"vCPU {t.vcpu} tid {t.tid}" for t in threads))
    status = listen(args.status_socket) if args.status_socket else None
    try:
        link = open_link(args, limits.heartbeat_period)
        peer = HostPeer(applier, limits, pin_cpus, link, log, time.monotonic)
        return peer.run(status)
    finally:
        applier.restore_all()  # also when attaching the link failed
        if status is not None:
            status.close()  # removes the socket file, if it is still ours


def online_cpus() -> frozenset[int]:
    from guestagent.linux.procfs import parse_cpulist

    try:
        with open("/sys/devices/system/cpu/online", encoding="ascii") as f:
            return frozenset(parse_cpulist(f.read()))
    except OSError:
        return frozenset(os.sched_getaffinity(0))


def restore_before_attach(state_dir: str, pid: int, dry_run: bool, log):
    """Apply leftover state files; the journal this peer will keep (None in a dry run).

    Refuses to attach while this VM's own state file could not be applied: the
    threads may still carry a dead peer's boost, which must not pass for original."""
    from guestagent.host.statefile import (
        RESTORED,
        UndoJournal,
        ensure_state_dir,
        process_id,
        restore_leftovers,
    )

    qemu, me = process_id(pid), process_id(os.getpid())
    if qemu is None or me is None:
        raise GuestagentError(f"QEMU pid {pid} exited")
    if not dry_run:
        ensure_state_dir(state_dir)
    try:
        outcomes = restore_leftovers(state_dir, dry_run)
    except GuestagentError as err:
        if not dry_run:
            raise
        log(f"dry run: {err}")  # say, run as a user who may not read root's state files
        return None
    for outcome in outcomes:
        for line in outcome.lines:
            log(line)
    stuck = [o for o in outcomes if o.qemu == qemu and o.result != RESTORED]
    if dry_run:
        return None
    if stuck:
        raise GuestagentError(f"{stuck[0].path} ({stuck[0].result}): this VM's threads may "
                              "still carry another peer's changes; resolve it first")
    return UndoJournal(state_dir, qemu, me)


def cmd_restore(args: argparse.Namespace) -> int:
    from guestagent.host.statefile import INCOMPLETE, REFUSED, restore_leftovers

    _require_root(args.dry_run)
    outcomes = restore_leftovers(args.state_dir, args.dry_run)
    if not args.dry_run:
        # Then the cgroup runtimes a killed `serve` granted: the kernel refuses to take
        # RT runtime from a cgroup while an RT thread is still in it.
        from guestagent.host.hostlog import HostLog
        from guestagent.host.serve import restore_cgroup_leftovers
        left = restore_cgroup_leftovers(args.state_dir, HostLog(verbose=True, stream=sys.stdout))
    else:
        left = {}
    for outcome in outcomes:
        bad = outcome.result in (REFUSED, INCOMPLETE)
        for line in outcome.lines:
            print(f"guestagent-host: {line}" if bad else line,
                  file=sys.stderr if bad else sys.stdout)
    if not outcomes:
        print(f"no state files in {args.state_dir}")
    return 1 if left or any(o.result in (REFUSED, INCOMPLETE) for o in outcomes) else 0


def cmd_status(args: argparse.Namespace) -> int:
    from guestagent.host.status import fetch, format_status

    doc = fetch(args.status_socket)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    elif doc.get("service"):
        from guestagent.host.serve import format_service
        print(format_service(doc))
    else:
        print(format_status(doc))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from guestagent.host.serve import ServeOptions, serve
    from guestagent.host.serviceconfig import load_service

    path = args.config
    if path is None and os.path.exists(DEFAULT_SERVICE_CONFIG):
        path = DEFAULT_SERVICE_CONFIG
    settings = load_service(path)
    _require_root(args.dry_run)
    return serve(ServeOptions(settings, args.state_dir, args.status_socket, args.dry_run,
                              args.verbose), restore_before_attach)


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
