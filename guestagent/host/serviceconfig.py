"""The host service's own settings: the [host] table of the host config file.

    [host]
    max_boosted_per_cpu = 1      # boosted threads per physical CPU
    max_boosted = 2              # on the host (default: one per CPU)
    max_boosted_per_vm = 1       # vCPUs of one VM (default: half the host's)
    boost_budget = 0.5           # seconds of boosted run time, earned back 1:1 unboosted
    emulator = "follow"          # "follow" | "never" | "always" (default: follow under TCG)
    rt_cgroup_budget_us = 0      # RT runtime to hand down cgroup chains; 0: never touch them
    rt_cgroup_per_thread_us = 50000
    libvirt_status_dir = "/run/libvirt/qemu"
    libvirt_domains = ["*"]      # shell patterns of the libvirt domain names to serve
    dropin_dir = "/etc/guestagent-host/vms.d"
    metrics_textfile = ""        # e.g. /var/lib/prometheus/node-exporter/guestagent-host.prom
    rescan_period = 2.0          # seconds between rescans when inotify cannot tell

The rest of the file are the per-VM limits (config.py). Errors name file and line.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any

from guestagent.errors import ConfigError
from guestagent.host.arbiter import ArbiterLimits
from guestagent.host.config import HostLimits, parse_limits, read_config_text
from guestagent.host.config import _line_of as line_of
from guestagent.host.dropins import DROPIN_DIR
from guestagent.host.libvirt import STATUS_DIR

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

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


def _int(v: Any, low: int, high: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise ValueError(f"must be an integer {low}..{high}")
    return v


def _seconds(v: Any, low: float, high: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise ValueError(f"must be a number of seconds, {low}..{high}")
    return float(v)


def _path(v: Any, empty_ok: bool = False) -> str:
    if not isinstance(v, str) or (not v and not empty_ok) or (v and not v.startswith("/")):
        raise ValueError("must be an absolute path" + (' or ""' if empty_ok else ""))
    return v


def _patterns(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise ValueError("must be a list of domain name patterns")
    return tuple(v)


def _emulator(v: Any) -> str:
    if v not in EMULATOR_POLICIES:
        raise ValueError('must be "follow", "never" or "always"')
    return v


CHECKS = {
    "max_boosted_per_cpu": ("arbiter", "per_cpu", lambda v: _int(v, 1, 64)),
    "max_boosted": ("arbiter", "host", lambda v: _int(v, 0, 1 << 16)),
    "max_boosted_per_vm": ("arbiter", "per_vm", lambda v: _int(v, 0, 1 << 16)),
    "boost_budget": ("arbiter", "budget", lambda v: _seconds(v, 0.001, 3600)),
    "emulator": ("service", "emulator", _emulator),
    "rt_cgroup_budget_us": ("service", "rt_cgroup_budget_us", lambda v: _int(v, 0, 10**7)),
    "rt_cgroup_per_thread_us": ("service", "rt_cgroup_per_thread_us",
                                lambda v: _int(v, 1, 10**7)),
    "libvirt_status_dir": ("service", "libvirt_status_dir", _path),
    "libvirt_domains": ("service", "libvirt_domains", _patterns),
    "dropin_dir": ("service", "dropin_dir", _path),
    "metrics_textfile": ("service", "metrics_textfile", lambda v: _path(v, empty_ok=True)),
    "rescan_period": ("service", "rescan_period", lambda v: _seconds(v, 0.1, 3600)),
}


def _line_of(text: str, key: str) -> int:
    """The line of `key` in the [host] table (the same name may be a per-VM key above)."""
    header = re.search(r"^[ \t]*\[host\]", text, re.MULTILINE)
    start = header.end() if header else 0
    return text.count("\n", 0, start) + line_of(text[start:], key)


def parse_service(text: str, path: str = "<config>") -> ServiceSettings:
    limits = parse_limits(text, path, tables=frozenset({"host"}))
    table = tomllib.loads(text).get("host", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}:{_line_of(text, 'host')}: host: must be a table [host]")
    arbiter: dict[str, Any] = {}
    service: dict[str, Any] = {}
    for key, raw in table.items():
        try:
            if key not in CHECKS:
                raise ValueError("unknown key")
            where, name, check = CHECKS[key]
            (arbiter if where == "arbiter" else service)[name] = check(raw)
        except ValueError as err:
            raise ConfigError(f"{path}:{_line_of(text, key)}: host.{key}: {err}") from None
    return ServiceSettings(limits=limits, arbiter=ArbiterLimits(**arbiter), **service)


def load_service(path: str | None) -> ServiceSettings:
    if path is None:
        return ServiceSettings()
    return parse_service(read_config_text(path), path)
