"""Hand-built snapshots for the pure policy and steering tests."""

from __future__ import annotations

from guestagent.observe import CpuState, IrqInfo, Snapshot, ThreadInfo
from guestagent.protocol.model import SchedClass

FIFO, RR, OTHER, BATCH, IDLE, DL = (SchedClass.FIFO, SchedClass.RR, SchedClass.OTHER,
                                    SchedClass.BATCH, SchedClass.IDLE, SchedClass.DEADLINE)


def thread(tid, policy=OTHER, prio=0, cpus=(0, 1), last=0, nice=0, comm=None, flags=0,
           cgroup="", exe=""):
    return ThreadInfo(tid=tid, tgid=tid, comm=comm or f"t{tid}", policy=policy,
                      rt_priority=prio, nice=nice, dl_runtime=0, dl_deadline=0, dl_period=0,
                      affinity=frozenset(cpus), last_cpu=last, state="S", cgroup=cgroup,
                      exe=exe, flags=flags)


def irq(n, cpu, rate=100.0, actions=("eth0-TxRx-0",), threads=(), netdevs=()):
    return IrqInfo(irq=n, chip="PCI-MSIX", hwirq="0", actions=actions, counts=(0, 0),
                   affinity=frozenset({0, 1}), effective_affinity=frozenset({cpu}), rate=rate,
                   threads=threads, netdevs=netdevs)


def cpus(n=2, busy=None, lowprio=None, online=None, isolated=()):
    everything = frozenset(range(n))
    return CpuState(possible=everything,
                    online=everything if online is None else frozenset(online),
                    isolated=frozenset(isolated), nohz_full=frozenset(),
                    partitions=frozenset(), steal={},
                    busy=dict(busy or {}), lowprio=dict(lowprio or {}))


def snap(threads=(), irqs=(), cpu_state=None, at=0.0):
    return Snapshot(taken_at=at, threads=tuple(threads), nr_threads=len(threads),
                    irqs=tuple(irqs), cpus=cpu_state or cpus(), notes=())
