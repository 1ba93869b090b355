"""Which vCPUs carry pinned critical work (and so should never share a physical CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestagent.observe.parse import irq_thread_number
from guestagent.protocol.model import SchedClass

if TYPE_CHECKING:
    from guestagent.observe import Snapshot


def pinned_critical(snapshot: Snapshot) -> dict[int, tuple[str, ...]]:
    """vCPU -> human-readable reasons.

    A vCPU carries pinned critical work when an RT (FIFO/RR/DEADLINE) thread's
    affinity is exactly that vCPU, or a threaded IRQ's effective affinity is
    exactly that vCPU. Per-CPU kernel threads (migration/N, ktimers/N...) are
    pinned on every CPU by construction and say nothing about the workload, so
    they do not count.
    """
    reasons: dict[int, list[str]] = {}
    for t in snapshot.threads:
        if not t.is_rt or len(t.affinity) != 1 or t.is_percpu_kthread:
            continue
        if t.is_kthread and irq_thread_number(t.comm) is not None:
            continue  # an IRQ thread follows its IRQ: reported once, by the IRQ rule below
        (cpu,) = t.affinity
        prio = f"{t.policy.name} {t.rt_priority}" if t.policy != SchedClass.DEADLINE \
            else f"DEADLINE {t.dl_runtime}/{t.dl_period} ns"
        reasons.setdefault(cpu, []).append(f"thread {t.tid} {t.comm!r} {prio} pinned here")
    for irq in snapshot.irqs:
        if not irq.threads or len(irq.effective_affinity) != 1:
            continue
        (cpu,) = irq.effective_affinity
        what = ", ".join(irq.actions) or irq.chip
        reasons.setdefault(cpu, []).append(f"threaded irq {irq.irq} ({what}) delivered here")
    return {cpu: tuple(r) for cpu, r in sorted(reasons.items())}
