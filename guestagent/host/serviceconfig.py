"""The host service's own settings: the [host] table of the host config file.

    [host]
    max_boosted_per_cpu = 1      # boosted threads per physical CPU
    max_boosted = 2              # on the host (default: one per CPU)
    max_boosted_per_vm = 1       # vCPUs of one VM (default: half the host's)
    boost_budget = 0.5           # seconds of boosted run time a thread may bank
    boost_share = 0.5            # ... earned per second: a boosted thread's RT share of a CPU
    emulator = "follow"          # "follow" | "never" | "always" (default: follow under TCG)
    rt_cgroup_budget_us = 0      # RT runtime to hand down cgroup chains; 0: never touch them
    rt_cgroup_per_thread_us = 50000
    libvirt_status_dir = "/run/libvirt/qemu"
    libvirt_domains = ["*"]      # shell patterns of the libvirt domain names to serve
    dropin_dir = "/etc/guestagent-host/vms.d"
    metrics_textfile = ""        # e.g. /var/lib/prometheus/node-exporter/guestagent-host.prom
    rescan_period = 2.0          # seconds between rescans when inotify cannot tell

The rest of the file are the per-VM limits (config.py). Both are checked by one
schema machinery (guestagent.linux.schema); errors name file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guestagent.host.arbiter import ArbiterLimits
from guestagent.host.config import HostLimits, limits_from
from guestagent.host.dropins import DROPIN_DIR
from guestagent.host.libvirt import STATUS_DIR
from guestagent.linux.schema import KeyLines, KeySpec, check_table, parse_document, read_text

EMULATOR_POLICIES = ("follow", "never", "always")


@dataclass(frozen=True)
class ServiceSettings:
    limits: HostLimits = field(default_factory=HostLimits)  # per VM
    arbiter: ArbiterLimits = field(default_factory=ArbiterLimits)
    emulator: str | None = None  # None: follow under TCG, never under KVM
    rt_cgroup_budget_us: int = 0
    rt_cgroup_per_thread_us: int = 50_000
    libvirt_status_dir: str = STATUS_DIR
    libvirt_domains: tuple[str, ...] = ("*",)
    dropin_dir: str = DROPIN_DIR
    metrics_textfile: str = ""
    rescan_period: float = 2.0

    def emulator_policy(self, accel: str) -> str:
        """What to do with a VM's main-loop thread: under TCG it delivers guest timers."""
        if self.emulator is not None:
            return self.emulator
        return "follow" if accel in ("tcg", "unknown") else "never"


SCHEMA: tuple[KeySpec, ...] = (
    KeySpec("host", "max_boosted_per_cpu", "int", 1,
            "Boosted (RT) threads per physical CPU.", 1, 64),
    KeySpec("host", "max_boosted", "int", None,
            "Boosted threads on the host, emulator threads included (default: one per CPU).",
            0, 1 << 16),
    KeySpec("host", "max_boosted_per_vm", "int", None,
            "Boosted vCPUs of one VM (default: half the host's).", 0, 1 << 16),
    KeySpec("host", "boost_budget", "float", 0.5,
            "Seconds of boosted run time a thread may bank (the burst).", 0.001, 3600),
    KeySpec("host", "boost_share", "float", 0.5,
            "Seconds of budget a thread earns per second: the share of a CPU it may hold at RT "
            "over time.", 0.01, 1.0),
    KeySpec("host", "emulator", "choice", None,
            "follow: boost QEMU's main-loop thread while any of the VM's vCPUs is boosted; "
            "always: the same under KVM too; never (default: follow under TCG, never under KVM).",
            choices=EMULATOR_POLICIES),
    KeySpec("host", "rt_cgroup_budget_us", "int", 0,
            "RT runtime (microseconds per period) to hand down cgroup chains; 0: never touch them.",
            0, 10**7),
    KeySpec("host", "rt_cgroup_per_thread_us", "int", 50_000,
            "What one thread's cgroup gets.", 1, 10**7),
    KeySpec("host", "libvirt_status_dir", "path", STATUS_DIR,
            "Where libvirt keeps its domains' status files.", nonempty=True),
    KeySpec("host", "libvirt_domains", "list[str]", ["*"],
            "Shell patterns of the libvirt domain names to serve.", nonempty=True),
    KeySpec("host", "dropin_dir", "path", DROPIN_DIR,
            "Drop-in files of plain QEMU VMs, one NAME.toml each.", nonempty=True),
    KeySpec("host", "metrics_textfile", "path", "",
            "A Prometheus textfile rewritten at each rescan; empty: none."),
    KeySpec("host", "rescan_period", "float", 2.0,
            "Seconds between rescans when inotify cannot tell.", 0.1, 3600),
)

# Keys of the [host] table that are ArbiterLimits fields, by field name; the others are
# ServiceSettings fields of the same name.
ARBITER_FIELDS = {"max_boosted_per_cpu": "per_cpu", "max_boosted": "host",
                  "max_boosted_per_vm": "per_vm", "boost_budget": "budget",
                  "boost_share": "share"}


def parse_service(text: str, path: str = "<config>") -> ServiceSettings:
    doc = parse_document(text, path)
    lines = KeyLines(text)
    limits = limits_from(doc, path, lines, tables=frozenset({"host"}))
    arbiter: dict[str, Any] = {}
    service: dict[str, Any] = {}
    for key, value in check_table(SCHEMA, "host", doc.get("host", {}), path, lines).items():
        if key in ARBITER_FIELDS:
            arbiter[ARBITER_FIELDS[key]] = value
        else:
            service[key] = tuple(value) if isinstance(value, list) else value
    return ServiceSettings(limits=limits, arbiter=ArbiterLimits(**arbiter), **service)


def load_service(path: str | None) -> ServiceSettings:
    if path is None:
        return ServiceSettings()
    return parse_service(read_text(path), path)
