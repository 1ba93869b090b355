"""Read-only views of the guest: tasks, irqs, cpus.

Each view takes one snapshot (two, a short interval apart, where it shows
rates) without the daemon, prints an aligned table or ``--json`` (schema in
docs/cli-json.md), and reports what it could not read on stderr, one line each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from guestagent.cli.args import cpu_number, seconds
from guestagent.display import escape, table

SCHEMA_VERSION = 1


def register(sub: argparse._SubParsersAction) -> None:
    tasks = sub.add_parser("tasks", help="threads with a real-time policy, a nice level, or "
                           "(with --all) every thread")
    tasks.add_argument("--rt", action="store_true", help="only FIFO, RR and DEADLINE threads")
    tasks.add_argument("--cpu", type=cpu_number, metavar="N",
                       help="only threads allowed on CPU N")
    tasks.add_argument("--all", action="store_true", help="every thread, not only those "
                       "with a non-default policy or nice")
    _common(tasks)
    tasks.set_defaults(func=cmd_tasks)

    irqs = sub.add_parser("irqs", help="interrupts: affinity, rate, IRQ threads, NIC queues")
    irqs.add_argument("--cpu", type=cpu_number, metavar="N",
                      help="only IRQs delivered to CPU N (effective affinity)")
    irqs.add_argument("--threaded", action="store_true", help="only IRQs with IRQ threads")
    _common(irqs, interval=True)
    irqs.set_defaults(func=cmd_irqs)

    cpus = sub.add_parser("cpus", help="vCPUs: online, isolation, steal time, pinned work")
    _common(cpus, interval=True)
    cpus.set_defaults(func=cmd_cpus)


def _common(p: argparse.ArgumentParser, interval: bool = False) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output "
                   "(docs/cli-json.md)")
    p.add_argument("--tree", metavar="DIR", help="read a recorded /proc and /sys tree "
                   "(DIR/proc, DIR/sys) instead of this machine")
    if interval:
        p.add_argument("--interval", type=seconds(0.01, allow_zero=True), default=0.25,
                       metavar="SECONDS",
                       help="time between the two sweeps that give rates (default 0.25; "
                       "0 for one sweep, rates then show 0)")


def _snapshots(args: argparse.Namespace, interest: Callable | None = None,
               paths: bool = True):
    """Take the snapshot(s) a view needs; notes go to stderr."""
    from guestagent.errors import GuestagentError
    from guestagent.observe import Observer, RecordedKernel

    kernel = None
    if args.tree:
        import os

        if not os.path.isdir(os.path.join(args.tree, "proc")):
            raise GuestagentError(f"{args.tree} is not a recorded tree (no proc/ inside)")
        kernel = RecordedKernel(args.tree)
    with Observer(kernel, interest=interest, watch=False, paths=paths) as obs:
        snap = obs.snapshot(time.monotonic())
        _check_cpu(args, snap)
        notes = list(snap.notes)
        interval = getattr(args, "interval", 0) or 0
        if interval > 0 and not args.tree:
            time.sleep(interval)
            snap = obs.snapshot(time.monotonic())
            notes += [n for n in snap.notes if n not in notes]
    for note in notes:
        print(f"guestagent: note: {escape(note)}", file=sys.stderr)
    return snap


def _check_cpu(args: argparse.Namespace, snap) -> None:
    """--cpu must name a CPU the machine (or tree) has, so an empty table means none."""
    from guestagent.errors import GuestagentError

    cpu = getattr(args, "cpu", None)
    known = snap.cpus.possible | snap.cpus.online
    if cpu is not None and known and cpu not in known:
        raise GuestagentError(f"--cpu {cpu}: no such CPU; this "
                              f"{'tree' if args.tree else 'machine'} has CPUs "
                              f"{_cpus_text(known)}")


def _cpus_text(cpus) -> str:
    from guestagent.observe.parse import format_cpulist

    return format_cpulist(cpus) or "-"


def _emit(args: argparse.Namespace, kind: str, doc: dict, text: str) -> int:
    if args.json:
        out = {"schema_version": SCHEMA_VERSION, "kind": kind}
        out.update(doc)
        json.dump(out, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


def thread_json(t) -> dict:
    return {
        "tid": t.tid, "tgid": t.tgid, "comm": t.comm, "policy": t.policy.name,
        "rt_priority": t.rt_priority, "nice": t.nice,
        "dl_runtime_ns": t.dl_runtime, "dl_deadline_ns": t.dl_deadline,
        "dl_period_ns": t.dl_period, "affinity": sorted(t.affinity),
        "last_cpu": t.last_cpu, "state": t.state, "cgroup": t.cgroup, "unit": t.unit,
        "exe": t.exe, "kthread": t.is_kthread,
    }


def _prio_text(t) -> str:
    if t.policy.name == "DEADLINE":
        return f"{t.dl_runtime // 1000}/{t.dl_deadline // 1000}/{t.dl_period // 1000}us"
    return str(t.rt_priority) if t.is_rt else "-"


def cmd_tasks(args: argparse.Namespace) -> int:
    snap = _snapshots(args, interest=(lambda ident: True) if args.all else None)
    threads = [t for t in snap.threads
               if (not args.rt or t.is_rt) and (args.cpu is None or args.cpu in t.affinity)]
    rows = [(t.tid, t.tgid, t.policy.name, _prio_text(t), t.nice, _cpus_text(t.affinity),
             t.last_cpu, t.state, t.unit or t.cgroup or "-", t.comm)
            for t in threads]
    text = table(("TID", "PID", "POLICY", "PRIO", "NICE", "AFFINITY", "CPU", "S", "UNIT",
                   "COMM"), rows)
    doc = {"nr_threads": snap.nr_threads, "tasks": [thread_json(t) for t in threads],
           "notes": list(snap.notes)}
    return _emit(args, "tasks", doc, text)


def cmd_irqs(args: argparse.Namespace) -> int:
    snap = _snapshots(args, paths=False)  # shows no executable paths
    irqs = [i for i in snap.irqs
            if (not args.threaded or i.threads)
            and (args.cpu is None or args.cpu in (i.effective_affinity or i.affinity))]
    rows = []
    for i in irqs:
        thread = ",".join(f"{t.tid}:{t.policy.name}/{t.rt_priority}" for t in i.threads) or "-"
        rows.append((i.irq, _cpus_text(i.effective_affinity), _cpus_text(i.affinity),
                     f"{i.rate:.1f}", i.total, thread, ",".join(i.netdevs) or "-",
                     i.chip, i.hwirq or "-", ", ".join(i.actions) or "-"))
    text = table(("IRQ", "EFFECTIVE", "AFFINITY", "RATE/s", "TOTAL", "THREADS", "NETDEV",
                   "CHIP", "HWIRQ", "ACTIONS"), rows)
    doc = {"irqs": [{
        "irq": i.irq, "chip": i.chip, "hwirq": i.hwirq, "actions": list(i.actions),
        "counts": list(i.counts), "total": i.total, "affinity": sorted(i.affinity),
        "effective_affinity": sorted(i.effective_affinity), "rate": round(i.rate, 3),
        "threads": [thread_json(t) for t in i.threads], "netdevs": list(i.netdevs),
    } for i in irqs], "notes": list(snap.notes)}
    return _emit(args, "irqs", doc, text)


def cmd_cpus(args: argparse.Namespace) -> int:
    from guestagent.observe import pinned_critical

    snap = _snapshots(args, paths=False)  # shows no executable paths
    c = snap.cpus
    pinned = pinned_critical(snap)
    rows = []
    per_cpu = []
    for cpu in sorted(c.possible | c.online):
        steal = c.steal.get(cpu)
        per_cpu.append({
            "cpu": cpu, "online": cpu in c.online, "isolated": cpu in c.isolated,
            "nohz_full": cpu in c.nohz_full, "partition": cpu in c.partitions,
            "steal": None if steal is None else round(steal, 4),
            "pinned_critical": list(pinned.get(cpu, ())),
        })
        rows.append((cpu, _yes(cpu in c.online), _yes(cpu in c.isolated),
                     _yes(cpu in c.nohz_full), _yes(cpu in c.partitions),
                     "-" if steal is None else f"{steal * 100:.1f}%",
                     "; ".join(pinned.get(cpu, ())) or "-"))
    text = table(("CPU", "ONLINE", "ISOLATED", "NOHZ_FULL", "PARTITION", "STEAL",
                   "PINNED_CRITICAL"), rows)
    doc = {"possible": sorted(c.possible), "online": sorted(c.online),
           "isolated": sorted(c.isolated), "nohz_full": sorted(c.nohz_full),
           "partitions": sorted(c.partitions), "cpus": per_cpu, "notes": list(snap.notes)}
    return _emit(args, "cpus", doc, text)


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"
