"""Writes the recorded /proc and /sys trees in this directory.

Each tree mimics, byte for byte in format, what a real kernel shows for a
shape this test machine lacks. The files are committed; this script documents
how they were made and regenerates them after a deliberate change:

    python3 tests/data/trees/generate.py

Formats follow fs/proc/array.c (stat, status), kernel/irq/proc.c
(/proc/interrupts: " %*d:" then "%10u " per online CPU, " %8s" chip,
" %*lu" hwirq, "-%-8s" flow name, "  %s" actions), fs/proc/stat.c and
kernel/sched/debug.c (sched, "%-45s:%21Ld").
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
PF_KTHREAD, PF_NO_SETAFFINITY = 0x00200000, 0x04000000
KTHREAD_FLAGS = 0x00208040  # PF_KTHREAD | PF_NOFREEZE | PF_FORKNOEXEC, as irq/N threads show
PERCPU_KTHREAD_FLAGS = KTHREAD_FLAGS | PF_NO_SETAFFINITY
USER_FLAGS = 0x00400000  # PF_RANDOMIZE, as a plain user thread shows


@dataclass
class Task:
    tid: int
    comm: str
    policy: int = 0
    rt_priority: int = 0
    nice: int = 0
    cpus: str = ""  # Cpus_allowed_list; "" = all online
    processor: int = 0
    state: str = "S"
    flags: int = USER_FLAGS
    dl: tuple | None = None  # (runtime, deadline, period) ns


@dataclass
class Process:
    pid: int
    tasks: list
    exe: str | None = None  # None: kernel thread
    cgroup: str = "/"
    ppid: int = 1


@dataclass
class Irq:
    irq: int
    chip: str
    hwirq: int
    flow: str
    actions: list
    counts: dict  # cpu -> count
    affinity: str
    effective: str


@dataclass
class Tree:
    name: str
    possible: int
    online: list
    isolated: str = ""
    nohz_full: str | None = None
    processes: list = field(default_factory=list)
    irqs: list = field(default_factory=list)
    steal: dict = field(default_factory=dict)
    partitions: dict = field(default_factory=dict)  # cgroup dir -> (partition, cpus)
    nics: dict = field(default_factory=dict)  # ifname -> [msi irqs]


def cpulist(cpus) -> str:
    cpus = sorted(cpus)
    out, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def cpumask(cpus, nr: int) -> str:
    value = sum(1 << c for c in cpus)
    words = [(value >> (32 * i)) & 0xFFFFFFFF for i in range((nr + 31) // 32)]
    return ",".join(f"{w:08x}" for w in reversed(words))


def write(path: str, text, mode: str = "w") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(text)


def stat_line(t: Task, proc: Process, nthreads: int) -> bytes:
    if t.policy in (1, 2):
        prio = -1 - t.rt_priority
    elif t.policy == 6:
        prio = -101
    else:
        prio = 20 + t.nice
    user = proc.exe is not None
    fields = [t.state, proc.ppid, proc.pid if user else 0, proc.pid if user else 0, 0, -1,
              t.flags, 120, 0, 0, 0, 3, 1, 0, 0, prio, t.nice, nthreads, 0, 1234,
              (2 << 20) if user else 0, 300 if user else 0, 18446744073709551615,
              *([1, 1, 0] if user else [0, 0, 0]), 0, 0, 0, 0, 0,
              2147483647 if not user else 16386, 1, 0, 0, 17, t.processor, t.rt_priority,
              t.policy, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    return f"{t.tid} (".encode() + t.comm.encode("utf-8", "surrogateescape") + b") " + \
        " ".join(map(str, fields)).encode() + b"\n"


def status_text(t: Task, proc: Process, allowed, nr: int) -> str:
    return (f"Name:\t{t.comm}\nUmask:\t0022\nState:\t{t.state} (sleeping)\nTgid:\t{proc.pid}\n"
            f"Ngid:\t0\nPid:\t{t.tid}\nPPid:\t{proc.ppid}\nTracerPid:\t0\n"
            f"Threads:\t{len(proc.tasks)}\nCpus_allowed:\t{cpumask(allowed, nr)}\n"
            f"Cpus_allowed_list:\t{cpulist(allowed)}\nMems_allowed_list:\t0\n"
            "voluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t0\n")


def sched_text(t: Task, proc: Process) -> str:
    lines = [f"{t.comm} ({t.tid}, #threads: {len(proc.tasks)})", "-" * 67]
    for key, value in (("se.exec_start", "1234.567890"), ("nr_switches", "12"),
                       ("policy", str(t.policy)), ("prio", "-1")):
        lines.append(f"{key:<45}:{value:>21}")
    if t.dl:
        for key, value in zip(("dl.runtime", "dl.deadline", "dl.period"), t.dl):
            lines.append(f"{key:<45}:{value:>21}")
    return "\n".join(lines) + "\n"


def interrupts_text(tree: Tree) -> str:
    online = tree.online
    out = [" " * 11 + "".join(f"CPU{c:<8}" for c in online)]  # "%*s" prec+8, "CPU%-8d"
    for irq in sorted(tree.irqs, key=lambda i: i.irq):
        counts = "".join(f" {irq.counts.get(c, 0):>10}" for c in online)
        out.append(f"{irq.irq:>3}:{counts} {irq.chip:>8} {irq.hwirq:>3}-{irq.flow:<8}"
                   f"  {', '.join(irq.actions)}".rstrip())
    for label, text in (("NMI", "Non-maskable interrupts"), ("LOC", "Local timer interrupts"),
                        ("RES", "Rescheduling interrupts")):
        counts = "".join(f" {1000 + 7 * c:>10}" for c in online)
        out.append(f"{label:>3}:{counts}   {text}")
    out.append(f"{'ERR':>3}: {0:>10}")
    out.append(f"{'MIS':>3}: {0:>10}")
    return "\n".join(out) + "\n"


def proc_stat_text(tree: Tree) -> str:
    rows = []
    for c in tree.online:
        steal = tree.steal.get(c, 0)
        rows.append((c, 4000 + c, 0, 2000, 90000, 100, 0, 30, steal, 0, 0))
    total = [sum(r[i] for r in rows) for i in range(1, 11)]
    out = ["cpu  " + " ".join(map(str, total))]
    out += [f"cpu{r[0]} " + " ".join(map(str, r[1:])) for r in rows]
    out += ["intr 123456 0 0", "ctxt 987654", "btime 1731000000", "processes 4321",
            "procs_running 2", "procs_blocked 0", "softirq 55555 0 1 2 3 4 5 6 7 8 9"]
    return "\n".join(out) + "\n"


def build(tree: Tree) -> None:
    root = os.path.join(HERE, tree.name)
    shutil.rmtree(root, ignore_errors=True)
    nr = tree.possible
    online = tree.online
    proc = os.path.join(root, "proc")
    for p in tree.processes:
        base = os.path.join(proc, str(p.pid))
        write(os.path.join(base, "cgroup"), f"0::{p.cgroup}\n")
        if p.exe:
            os.makedirs(base, exist_ok=True)
            os.symlink(p.exe, os.path.join(base, "exe"))
        for t in p.tasks:
            allowed = _cpus(t.cpus) if t.cpus else online
            tdir = os.path.join(base, "task", str(t.tid))
            write(os.path.join(tdir, "stat"), stat_line(t, p, len(p.tasks)), "wb")
            write(os.path.join(tdir, "comm"), t.comm.encode("utf-8", "surrogateescape") + b"\n",
                  "wb")
            write(os.path.join(tdir, "status"), status_text(t, p, allowed, nr))
            write(os.path.join(tdir, "sched"), sched_text(t, p))
            write(os.path.join(tdir, "cgroup"), f"0::{p.cgroup}\n")
    write(os.path.join(proc, "interrupts"), interrupts_text(tree))
    write(os.path.join(proc, "stat"), proc_stat_text(tree))
    for irq in tree.irqs:
        idir = os.path.join(proc, "irq", str(irq.irq))
        aff, eff = _cpus(irq.affinity), _cpus(irq.effective)
        write(os.path.join(idir, "smp_affinity_list"), cpulist(aff) + "\n")
        write(os.path.join(idir, "smp_affinity"), cpumask(aff, nr) + "\n")
        write(os.path.join(idir, "effective_affinity_list"), cpulist(eff) + "\n")
        write(os.path.join(idir, "effective_affinity"), cpumask(eff, nr) + "\n")
    write(os.path.join(proc, "self", "mountinfo"),
          "24 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
          "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 "
          "cgroup2 rw,nsdelegate,memory_recursiveprot\n")
    cpu = os.path.join(root, "sys", "devices", "system", "cpu")
    write(os.path.join(cpu, "possible"), f"0-{nr - 1}\n")
    write(os.path.join(cpu, "present"), f"0-{nr - 1}\n")
    write(os.path.join(cpu, "online"), cpulist(online) + "\n")
    write(os.path.join(cpu, "offline"), cpulist(set(range(nr)) - set(online)) + "\n")
    write(os.path.join(cpu, "isolated"), tree.isolated + "\n")
    write(os.path.join(cpu, "kernel_max"), "8191\n")
    if tree.nohz_full is not None:  # the file exists only on CONFIG_NO_HZ_FULL kernels
        write(os.path.join(cpu, "nohz_full"), (tree.nohz_full or "(null)") + "\n")
    for c in range(nr):
        write(os.path.join(cpu, f"cpu{c}", "online"), f"{int(c in online)}\n")
    cg = os.path.join(root, "sys", "fs", "cgroup")
    write(os.path.join(cg, "cgroup.procs"), "1\n")
    write(os.path.join(cg, "cgroup.subtree_control"), "cpuset cpu io memory pids\n")
    write(os.path.join(cg, "cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma\n")
    for name, (partition, cpus) in tree.partitions.items():
        d = os.path.join(cg, name)
        write(os.path.join(d, "cgroup.procs"), "")
        write(os.path.join(d, "cgroup.subtree_control"), "\n")
        write(os.path.join(d, "cpuset.cpus"), cpus + "\n")
        write(os.path.join(d, "cpuset.cpus.effective"), cpus + "\n")
        write(os.path.join(d, "cpuset.cpus.partition"), partition + "\n")
    net = os.path.join(root, "sys", "class", "net")
    write(os.path.join(net, "lo", "operstate"), "unknown\n")
    for ifname, irqs in tree.nics.items():
        write(os.path.join(net, ifname, "operstate"), "up\n")
        for n in irqs:
            write(os.path.join(net, ifname, "device", "msi_irqs", str(n)), "msix\n")


def _cpus(text: str) -> list:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def kthread(pid: int, comm: str, **kw) -> Process:
    kw.setdefault("flags", KTHREAD_FLAGS)
    return Process(pid, [Task(pid, comm, **kw)], exe=None, ppid=2)


def vm64() -> Tree:
    """64 vCPUs; isolcpus=nohz_full=56-63; an isolated cpuset partition 48-55; NVMe."""
    online = list(range(64))
    procs = [Process(1, [Task(1, "systemd")], "/usr/lib/systemd/systemd", "/init.scope", 0),
             kthread(2, "kthreadd")]
    procs += [kthread(20 + c, f"migration/{c}", policy=1, rt_priority=99, cpus=str(c),
                      processor=c, flags=PERCPU_KTHREAD_FLAGS) for c in range(0, 64, 8)]
    procs.append(Process(4100, [
        Task(4100, "cyclictest", cpus="0-55"),
        Task(4101, "cyclictest", policy=1, rt_priority=95, cpus="60", processor=60),
        Task(4102, "cyclictest", policy=1, rt_priority=95, cpus="61", processor=61),
    ], "/usr/bin/cyclictest", "/rt.slice/cyclictest.service"))
    procs.append(Process(900, [Task(900, "chronyd", nice=-5)], "/usr/sbin/chronyd",
                         "/system.slice/chronyd.service"))
    procs.append(Process(1500, [Task(1500, "backup", policy=3, nice=10),
                                Task(1501, "backup-io", policy=5)],
                         "/usr/bin/backup", "/user.slice/user-1000.slice/session-3.scope"))
    procs.append(Process(1600, [Task(1600, "pw-data-loop", policy=2, rt_priority=88,
                                     cpus="48-55", processor=50)],
                         "/usr/bin/pipewire", "/rt.slice/pipewire.service"))
    irqs = [Irq(1, "IO-APIC", 1, "edge", ["i8042"], {0: 9}, "0-63", "0"),
            Irq(4, "IO-APIC", 4, "edge", ["ttyS0"], {3: 120}, "0-63", "3")]
    # nvme0: admin queue plus one I/O queue per 8 CPUs (managed affinity)
    irqs.append(Irq(24, "PCI-MSIX-0000:00:04.0", 0, "edge", ["nvme0q0"], {0: 40}, "0-63", "0"))
    for q in range(1, 9):
        cpus = f"{(q - 1) * 8}-{q * 8 - 1}"
        irqs.append(Irq(24 + q, "PCI-MSIX-0000:00:04.0", q, "edge", [f"nvme0q{q}"],
                        {(q - 1) * 8: 1000 * q}, cpus, str((q - 1) * 8)))
    for i, (label, count) in enumerate((("input", 5000), ("output", 4000))):
        for q in range(4):
            n = 40 + 2 * q + i
            irqs.append(Irq(n, "PCI-MSIX-0000:00:03.0", 1 + 2 * q + i, "edge",
                            [f"virtio1-{label}.{q}"], {q: count}, str(q), str(q)))
    return Tree("vm64", 64, online, isolated="56-63", nohz_full="56-63", processes=procs,
                irqs=irqs, steal={c: 10 * c for c in online},
                partitions={"rt.slice": ("isolated", "48-55"),
                            "system.slice": ("member", "0-47")},
                nics={"eth0": []})


def offline() -> Tree:
    """8 possible vCPUs, 4, 5 and 7 offline (hot-unplugged by the host or by hand)."""
    online = [0, 1, 2, 3, 6]
    procs = [Process(1, [Task(1, "systemd")], "/usr/lib/systemd/systemd", "/init.scope", 0),
             Process(700, [Task(700, "rtapp", policy=1, rt_priority=50, cpus="6",
                                processor=6)], "/opt/rtapp", "/system.slice/rtapp.service")]
    irqs = [Irq(1, "IO-APIC", 1, "edge", ["i8042"], {0: 9, 6: 2}, "0-3,6", "6"),
            Irq(9, "IO-APIC", 9, "fasteoi", ["acpi"], {1: 3}, "0-3,6", "1")]
    return Tree("offline", 8, online, processes=procs, irqs=irqs,
                steal={0: 100, 1: 0, 2: 5, 3: 0, 6: 42})


def preempt_rt() -> Tree:
    """A PREEMPT_RT kernel on 4 vCPUs: every IRQ threaded, ktimers/rcuc per CPU,
    an ixgbe-style NIC with 4 TxRx queues, NVMe, and a SCHED_DEADLINE task."""
    online = list(range(4))
    procs = [Process(1, [Task(1, "systemd")], "/usr/lib/systemd/systemd", "/init.scope", 0),
             kthread(2, "kthreadd")]
    pid = 10
    for c in online:
        procs.append(kthread(pid, f"ktimers/{c}", policy=1, rt_priority=1, cpus=str(c),
                             processor=c, flags=PERCPU_KTHREAD_FLAGS))
        procs.append(kthread(pid + 1, f"rcuc/{c}", policy=1, rt_priority=1, cpus=str(c),
                             processor=c, flags=PERCPU_KTHREAD_FLAGS))
        pid += 2
    irqs = [Irq(9, "IO-APIC", 9, "fasteoi", ["acpi"], {0: 4}, "0-3", "0")]
    procs.append(kthread(120, "irq/9-acpi", policy=1, rt_priority=50, cpus="0-3"))
    for q in range(4):  # eth0-TxRx-N: comm "irq/131-eth0-Tx" is cut at 15 bytes
        n = 131 + q
        irqs.append(Irq(n, "IR-PCI-MSIX-0000:03:00.0", q, "edge", [f"eth0-TxRx-{q}"],
                        {q: 20000 + q}, str(q), str(q)))
        procs.append(kthread(200 + q, f"irq/{n}-eth0-TxRx-{q}"[:15], policy=1, rt_priority=50,
                             cpus=str(q), processor=q))
    irqs.append(Irq(135, "IR-PCI-MSIX-0000:03:00.0", 4, "edge", ["eth0"], {0: 7}, "0-3", "1"))
    procs.append(kthread(204, "irq/135-eth0", policy=1, rt_priority=50, cpus="1"))
    # a shared line with a secondary handler: irq/N-s-name runs beside irq/N-name
    irqs.append(Irq(16, "IO-APIC", 16, "fasteoi", ["ehci_hcd:usb1", "snd_hda_intel"],
                    {2: 300}, "0-3", "2"))
    procs.append(kthread(210, "irq/16-ehci_hcd", policy=1, rt_priority=50, cpus="2"))
    procs.append(kthread(211, "irq/16-s-ehci_h", policy=1, rt_priority=49, cpus="2"))
    for q in range(5):
        n = 140 + q
        eff = str(max(0, q - 1))
        irqs.append(Irq(n, "IR-PCI-MSIX-0000:01:00.0", q, "edge", [f"nvme0q{q}"], {0: 50 * q},
                        "0-3" if q == 0 else eff, eff))
        procs.append(kthread(220 + q, f"irq/{n}-nvme0q{q}", policy=1, rt_priority=50, cpus=eff))
    procs.append(Process(3000, [Task(3000, "ctl-loop", policy=6, dl=(500_000, 1_000_000,
                                                                      1_000_000))],
                         "/opt/plant/ctl", "/system.slice/plant.service"))
    return Tree("preempt-rt", 4, online, nohz_full="", processes=procs, irqs=irqs,
                nics={"eth0": [131, 132, 133, 134, 135]})


if __name__ == "__main__":
    for make in (vm64, offline, preempt_rt):
        tree = make()
        build(tree)
        print(f"wrote {os.path.join(HERE, tree.name)}")
