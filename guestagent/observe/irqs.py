"""The IRQ table: /proc/interrupts, per-IRQ affinity, rates, IRQ threads, NIC queues."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from guestagent.observe.kernel import Kernel
from guestagent.observe.parse import ParseError, parse_cpulist, parse_interrupts
from guestagent.observe.threads import ThreadInfo, irq_threads_by_number


@dataclass(frozen=True)
class IrqInfo:
    """One numbered interrupt line."""

    irq: int
    chip: str
    hwirq: str
    actions: tuple[str, ...]
    counts: tuple[int, ...]  # per CPU, index = cpu number
    affinity: frozenset[int]
    effective_affinity: frozenset[int]
    rate: float  # interrupts/s since the previous sweep; 0.0 on the first
    threads: tuple[ThreadInfo, ...] = ()  # its irq/N-name and irq/N-s-name kthreads
    netdevs: tuple[str, ...] = ()  # network interfaces whose queues use it

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def threaded(self) -> bool:
        return bool(self.threads)


def match_netdev_actions(ifname: str, action: str, device_name: str = "") -> bool:
    """Does an IRQ action name belong to the interface? ('eth0-TxRx-0',
    'i40e-eth0-TxRx-1', 'eth0', or 'virtio2-input.0' for a virtio NIC named by its
    device)."""
    if action == ifname or action.startswith(ifname + "-") or f"-{ifname}-" in action:
        return True
    return bool(device_name) and action.startswith(device_name + "-")


def netdev_irqs(kernel: Kernel, links: Sequence[str],
                actions: Mapping[int, Sequence[str]]) -> dict[int, tuple[str, ...]]:
    """IRQ -> interfaces, from each device's msi_irqs (or its parent's, for virtio
    devices that sit on a PCI function), plus action names as a fallback."""
    out: dict[int, list[str]] = {}
    for ifname in links:
        dev = f"/sys/class/net/{ifname}/device"
        if not kernel.exists(dev):
            continue  # virtual link: lo, bridges, ifb...
        irqs = set(_msi_irqs(kernel, f"{dev}/msi_irqs") or _msi_irqs(kernel, f"{dev}/../msi_irqs"))
        try:
            device_name = os.path.basename(kernel.readlink(dev))
        except OSError:
            device_name = ""
        if not device_name.startswith("virtio"):
            device_name = ""
        for irq, names in actions.items():
            if any(match_netdev_actions(ifname, a, device_name) for a in names):
                irqs.add(irq)
        for irq in irqs:
            out.setdefault(irq, []).append(ifname)
    return {irq: tuple(sorted(set(names))) for irq, names in out.items()}


def with_irq_threads(irqs: tuple[IrqInfo, ...],
                     threads: Iterable[ThreadInfo]) -> tuple[IrqInfo, ...]:
    """The same IRQ table with each IRQ's threads taken from a newer thread sweep."""
    by_irq = irq_threads_by_number(threads)
    out = []
    changed = False
    for irq in irqs:
        current = by_irq.get(irq.irq, ())
        if current != irq.threads:  # the thread sweep reuses unchanged ThreadInfo objects
            irq = replace(irq, threads=current)
            changed = True
        out.append(irq)
    return tuple(out) if changed else irqs


def _msi_irqs(kernel: Kernel, path: str) -> list[int]:
    try:
        return [int(n) for n in kernel.listdir(path) if n.isdigit()]
    except OSError:
        return []


class IrqTable:
    """Reads interrupts each sweep; remembers the previous totals for rates."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel
        self._prev: dict[int, int] = {}
        self._prev_at: float | None = None
        self._netdevs: dict[int, tuple[str, ...]] = {}
        self._netdev_key: frozenset[int] | None = None

    def sweep(self, now: float, threads: Iterable[ThreadInfo]
              ) -> tuple[tuple[IrqInfo, ...], list[tuple[str, str]]]:
        """Returns (irqs by number, [(note key, note line)])."""
        notes: list[tuple[str, str]] = []
        try:
            lines, skipped = parse_interrupts(self._kernel.read_text("/proc/interrupts"))
        except (OSError, ParseError) as err:
            why = getattr(err, "strerror", None) or str(err)
            return (), [("interrupts", f"/proc/interrupts unreadable ({why}): no IRQ table")]
        if skipped:
            notes.append(("interrupts-skip", f"{skipped} malformed /proc/interrupts lines skipped"))
        key = frozenset(line.irq for line in lines)
        if key != self._netdev_key:  # new IRQs usually mean a new device: re-map NICs
            self._netdevs = self._map_netdevs({ln.irq: ln.actions for ln in lines}, notes)
            self._netdev_key = key
        by_irq = irq_threads_by_number(threads)
        dt = None if self._prev_at is None else now - self._prev_at
        out: list[IrqInfo] = []
        totals: dict[int, int] = {}
        unreadable = 0
        for ln in lines:
            total = sum(ln.counts)
            totals[ln.irq] = total
            before = self._prev.get(ln.irq)
            rate = 0.0
            if dt and dt > 0 and before is not None and total >= before:
                rate = (total - before) / dt
            aff, eff, ok = self._affinity(ln.irq)
            unreadable += not ok
            out.append(IrqInfo(ln.irq, ln.chip, ln.hwirq, ln.actions, ln.counts, aff, eff,
                               rate, by_irq.get(ln.irq, ()), self._netdevs.get(ln.irq, ())))
        if unreadable:
            notes.append(("irq-affinity", f"affinity of {unreadable} IRQs unreadable: "
                          "shown empty"))
        self._prev, self._prev_at = totals, now
        return tuple(out), notes

    def _affinity(self, irq: int) -> tuple[frozenset[int], frozenset[int], bool]:
        ok = True
        values = []
        for name in ("smp_affinity_list", "effective_affinity_list"):
            try:
                values.append(parse_cpulist(self._kernel.read_text(f"/proc/irq/{irq}/{name}")))
            except FileNotFoundError:
                values.append(frozenset())  # older kernels lack effective_affinity_list
            except (OSError, ParseError):
                values.append(frozenset())
                ok = False
        return values[0], values[1], ok

    def _map_netdevs(self, actions: Mapping[int, Sequence[str]],
                     notes: list[tuple[str, str]]) -> dict[int, tuple[str, ...]]:
        try:
            links = self._kernel.net_links()
        except OSError as err:
            notes.append(("netlinks", f"network links unreadable ({err.strerror}): "
                          "NIC IRQs not mapped"))
            return {}
        return netdev_irqs(self._kernel, links, actions)
