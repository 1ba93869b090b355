"""The host service's metrics as a Prometheus textfile (node_exporter's textfile collector).

Rendering is pure; write_textfile() replaces the file atomically (the collector
may read at any time), without fsync: the file is rewritten every few seconds
and means nothing after a reboot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

PREFIX = "guestagent_host"


@dataclass(frozen=True)
class ThreadMetrics:
    vm: str
    thread: str  # "0", "1", ... for vCPUs; "emulator"
    boosted_seconds: float
    budget_exhaustions: int
    clamps: int
    eperm: int


@dataclass(frozen=True)
class VmMetrics:
    vm: str
    served: bool
    lease_expiries: int


METRICS = (
    ("boosted_seconds_total", "counter", "Seconds a thread ran with a boost granted."),
    ("budget_exhaustions_total", "counter", "Times a thread's boost budget ran out."),
    ("clamps_total", "counter", "Boosts granted at less than the guest asked."),
    ("eperm_total", "counter", "Scheduler changes the kernel refused with EPERM."),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(threads: Iterable[ThreadMetrics], vms: Iterable[VmMetrics]) -> str:
    threads, vms = list(threads), list(vms)
    out = []
    for name, kind, help_text in METRICS:
        out += [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} {kind}"]
        field = name[:-len("_total")] if name.endswith("_total") else name
        for t in threads:
            value = getattr(t, field)
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            out.append(f'{PREFIX}_{name}{{vm="{_label(t.vm)}",thread="{_label(t.thread)}"}} '
                       f"{shown}")
    out += [f"# HELP {PREFIX}_lease_expiries_total Times a guest went quiet while boosted.",
            f"# TYPE {PREFIX}_lease_expiries_total counter"]
    out += [f'{PREFIX}_lease_expiries_total{{vm="{_label(v.vm)}"}} {v.lease_expiries}'
            for v in vms]
    out += [f"# HELP {PREFIX}_vm_served Whether the VM has a hints transport and is served.",
            f"# TYPE {PREFIX}_vm_served gauge"]
    out += [f'{PREFIX}_vm_served{{vm="{_label(v.vm)}"}} {int(v.served)}' for v in vms]
    return "\n".join(out) + "\n"


def write_textfile(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # the collector skips names not ending in .prom
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)

