"""/etc/guestagent/guestagent.toml: schema, defaults, strict validation.

The schema below is the single source for the defaults, the validation, the
commented default file shipped as a conffile, and guestagent.toml(5). Errors
name the file and the line of the offending key.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from guestagent.errors import ConfigError
from guestagent.linux.procfs import systemd_unit
from guestagent.linux.schema import KeyLines, KeySpec, check_value, parse_document
from guestagent.protocol.model import SchedClass
from guestagent.sched import NICE_MAX, NICE_MIN, POLICY_BY_NAME, RT_PRIORITY_MAX

DEFAULT_PATH = "/etc/guestagent/guestagent.toml"
RUN_DIR = "/run/guestagent"  # the daemon's own directory: the one it may create


SCHEMA: tuple[KeySpec, ...] = (
    KeySpec("agent", "sweep_interval_ms", "int", 100,
            "Shortest time between two sweeps of the thread table's scheduling policies.",
            10, 60_000),
    KeySpec("agent", "cpu_budget_percent", "float", 0.4,
            "Sweeps are spaced so that sweeping costs at most this share of one CPU; "
            "with many threads this stretches the interval beyond sweep_interval_ms. "
            "Where scheduler changes wake the agent (syscall tracepoints), periodic "
            "sweeps get half of it and the sweeps those changes trigger the other half.",
            0.01, 100),
    KeySpec("agent", "heartbeat_interval_ms", "int", 1000,
            "How often the agent proves to the host that it is alive. The host ends boosts "
            "within two periods of the heartbeat stopping.", 100, 60_000),
    KeySpec("agent", "log_level", "choice", "info", "Lowest level logged.",
            choices=("debug", "info", "warning", "error")),
    KeySpec("transport", "mode", "choice", "auto",
            "auto: the ivshmem region if present, else the virtio-serial port, else a local "
            "region file. region, channel, local: only that one.",
            choices=("auto", "region", "channel", "local")),
    KeySpec("transport", "port_name", "str", "org.guestagent.hints.0",
            "Name of the virtio-serial port (under /dev/virtio-ports/)."),
    KeySpec("transport", "region_path", "str", "",
            "A region file to use instead of an ivshmem device (for example /dev/shm/x). "
            "Empty: find the ivshmem device by PCI id 1af4:1110."),
    KeySpec("transport", "local_region", "str", "/run/guestagent/region",
            "The region file used when no host transport exists, so the CLI works anywhere."),
    KeySpec("control", "socket", "str", "/run/guestagent/control.sock",
            "The control socket the CLI talks to."),
    KeySpec("control", "group", "str", "guestagent",
            "Members of this group may read the agent's state; only root may change it."),
    KeySpec("policy", "hold_time_ms", "int", 2000,
            "A boost is published at once; an unboost only after the vCPU has needed less "
            "for this long.", 0, 3_600_000),
    KeySpec("policy", "min_change_interval_ms", "int", 200,
            "Per-vCPU rate limit: after a change, a vCPU's hint is held at least this long, "
            "unless the new hint is a stronger boost.", 0, 3_600_000),
    KeySpec("policy", "unboost", "bool", True,
            "Ask the host to lower vCPUs that run only SCHED_IDLE, SCHED_BATCH or positively "
            "niced work."),
    KeySpec("policy", "unboost_idle", "bool", False,
            "Also ask to lower vCPUs with nothing of note on them. Off by default: an idle "
            "vCPU may wake for an interrupt at any time."),
    KeySpec("policy", "floating_rt", "choice", "last_cpu",
            "How an RT thread allowed on several vCPUs counts. last_cpu: for the vCPU it last "
            "ran on; all: for every vCPU it may run on; ignore: not at all.",
            choices=("last_cpu", "all", "ignore")),
    KeySpec("policy", "threaded_irqs", "bool", True,
            "Count threaded IRQ kthreads like RT threads: the vCPU of their effective "
            "affinity needs their priority."),
    KeySpec("policy", "critical_irqs", "list[str]", [],
            "IRQs whose vCPU gets the critical-IRQ flag and a co-location group: glob patterns "
            "matched against the IRQ's action names (for example \"nvme0q*\")."),
    KeySpec("policy", "critical_netdevs", "list[str]", [],
            "Network interfaces whose queue IRQs are critical (for example \"eth0\")."),
    KeySpec("policy", "critical_irq_rate", "int", 0,
            "IRQs firing faster than this many per second are critical; 0 disables.",
            0, 10_000_000),
    KeySpec("steering", "enabled", "bool", False,
            "Steer the threads of rules with steer = true onto the vCPUs with the most host "
            "capacity. Off by default: steering changes task affinity."),
    KeySpec("steering", "dry_run", "bool", False,
            "Log the affinity changes steering would make, and make none."),
    KeySpec("steering", "hysteresis", "int", 128,
            "Move a task only to a vCPU with at least this much more capacity (of 1024).",
            0, 1024),
    KeySpec("steering", "min_dwell_ms", "int", 5000,
            "A steered task stays at least this long before it is moved again.",
            0, 3_600_000),
    KeySpec("metrics", "textfile_dir", "str", "",
            "node_exporter textfile-collector directory to write guestagent.prom into; "
            "empty disables."),
    KeySpec("metrics", "interval_ms", "int", 15000,
            "How often the metrics file is rewritten.", 1000, 3_600_000),
)

# [[rule]] tables: each marks matching tasks latency-sensitive.
RULE_KEYS: tuple[KeySpec, ...] = (
    KeySpec("rule", "name", "str", "", "Name shown in hint reasons (required)."),
    KeySpec("rule", "comm", "str", "", "Glob matched against the thread's comm."),
    KeySpec("rule", "cgroup", "str", "", "Glob matched against the process's cgroup v2 path."),
    KeySpec("rule", "unit", "str", "",
            "systemd unit the process belongs to (glob, for example \"pipewire*.service\")."),
    KeySpec("rule", "exe", "str", "", "Glob matched against the process's executable path."),
    KeySpec("rule", "sched", "choice", "fifo",
            "Class the vCPU running a matching task needs.",
            choices=("fifo", "rr", "deadline", "other")),
    KeySpec("rule", "priority", "int", 1,
            "RT priority needed (fifo, rr, deadline).", 1, RT_PRIORITY_MAX),
    KeySpec("rule", "nice", "int", 0, "Nice level needed (other).", NICE_MIN, NICE_MAX),
    KeySpec("rule", "sleeper", "bool", True,
            "Tasks mostly sleep and need low wake-up latency rather than throughput."),
    KeySpec("rule", "steer", "bool", False,
            "Steer matching tasks onto the vCPUs with the most host capacity "
            "(needs [steering] enabled)."),
    KeySpec("rule", "allow_isolated", "bool", False,
            "Steering may use CPUs the admin isolated (isolcpus, nohz_full, isolated "
            "partitions)."),
)
RULE_MATCH_KEYS = ("comm", "cgroup", "unit", "exe")


@dataclass(frozen=True)
class Rule:
    name: str
    comm: str = ""
    cgroup: str = ""
    unit: str = ""
    exe: str = ""
    sched: str = "fifo"
    priority: int = 1
    nice: int = 0
    sleeper: bool = True
    steer: bool = False
    allow_isolated: bool = False

    @property
    def sched_class(self) -> SchedClass:
        return SchedClass(POLICY_BY_NAME[self.sched])

    def matches(self, comm: str, cgroup: str, exe: str) -> bool:
        """True when every pattern the rule sets matches (an unread field never matches)."""
        checks = ((self.comm, comm), (self.cgroup, cgroup), (self.exe, exe),
                  (self.unit, systemd_unit(cgroup)))
        return all(fnmatch.fnmatchcase(value, pattern) for pattern, value in checks if pattern)


def first_rule(rules: Iterable[Rule], task) -> Rule | None:
    """The first rule, in config order, that matches a task (anything with comm,
    cgroup and exe: a ThreadInfo or a ThreadIdentity); it alone names the task."""
    for rule in rules:
        if rule.matches(task.comm, task.cgroup, task.exe):
            return rule
    return None


@dataclass(frozen=True)
class Config:
    """Validated configuration; sections are plain mappings of key to value."""

    values: Mapping[str, Mapping[str, Any]]
    rules: tuple[Rule, ...] = ()
    source: str = "<defaults>"

    def get(self, section: str, name: str) -> Any:
        return self.values[section][name]

    @property
    def agent(self) -> Mapping[str, Any]:
        return self.values["agent"]

    @property
    def transport(self) -> Mapping[str, Any]:
        return self.values["transport"]

    @property
    def control(self) -> Mapping[str, Any]:
        return self.values["control"]

    @property
    def policy(self) -> Mapping[str, Any]:
        return self.values["policy"]

    @property
    def steering(self) -> Mapping[str, Any]:
        return self.values["steering"]

    @property
    def metrics(self) -> Mapping[str, Any]:
        return self.values["metrics"]


def sections() -> tuple[str, ...]:
    return tuple(dict.fromkeys(k.section for k in SCHEMA))


def default_config() -> Config:
    values: dict[str, dict[str, Any]] = {s: {} for s in sections()}
    for key in SCHEMA:
        values[key.section][key.name] = _copy(key.default)
    return Config(values=values)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


# -- parsing -----------------------------------------------------------------


def load_config(path: str = DEFAULT_PATH, missing_ok: bool = False) -> Config:
    """Read and validate a config file. A missing default file means defaults."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if missing_ok:
            return default_config()
        raise ConfigError(f"{path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    return parse_config(raw, path)


def parse_config(raw: bytes, path: str = "<string>") -> Config:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 (byte {err.start})") from None
    data = parse_document(text, path)  # `path:line: what`, the line from the text itself
    lines = KeyLines(text)
    values = default_config().values
    specs = {(k.section, k.name): k for k in SCHEMA}
    for section, table in data.items():
        if section == "rule":
            continue
        if section not in values:
            raise ConfigError(f"{path}:{lines.table(section)}: unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}:{lines.key('', section)}: {section} must be a table")
        for name, value in table.items():
            where = f"{path}:{lines.key(section, name)}"
            spec = specs.get((section, name))
            if spec is None:
                raise ConfigError(f"{where}: unknown key {section}.{name}")
            values[section][name] = check_value(spec, value, where)  # type: ignore[index]
    check_paths(values, path, lines)
    rules = parse_rules(data.get("rule", []), path, lines)
    return Config(values=values, rules=rules, source=path)


def check_paths(values: Mapping[str, Mapping[str, Any]], path: str, lines: KeyLines) -> None:
    """Refuse paths the daemon cannot use safely: it creates no directory but RUN_DIR."""
    socket = values["control"]["socket"]
    if not os.path.isabs(socket):
        raise ConfigError(f"{path}:{lines.key('control', 'socket')}: control.socket must be an "
                          f"absolute path, not {socket!r}")
    textfile_dir = values["metrics"]["textfile_dir"]  # written into, so it must exist itself
    for section, name, parent in (
            ("transport", "local_region", os.path.dirname(values["transport"]["local_region"])),
            ("control", "socket", os.path.dirname(socket)),
            ("metrics", "textfile_dir", textfile_dir and os.path.normpath(textfile_dir))):
        if parent and parent != RUN_DIR and not os.path.isdir(parent):
            raise ConfigError(f"{path}:{lines.key(section, name)}: {section}.{name}: directory "
                              f"{parent} does not exist")


def parse_rules(raw: Any, path: str, lines: KeyLines) -> tuple[Rule, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}:{lines.key('', 'rule')}: rule must be an array of tables "
                          "([[rule]])")
    specs = {k.name: k for k in RULE_KEYS}
    rules = []
    names: set[str] = set()
    for index, table in enumerate(raw):
        head = f"{path}:{lines.array_table('rule', index)}"
        fields: dict[str, Any] = {}
        for name, value in table.items():
            where = f"{path}:{lines.key(('rule', index), name)}"
            spec = specs.get(name)
            if spec is None:
                raise ConfigError(f"{where}: unknown key rule.{name}")
            fields[name] = check_value(spec, value, where)
        if not fields.get("name"):
            raise ConfigError(f"{head}: rule needs a name")
        if fields["name"] in names:
            raise ConfigError(f"{head}: duplicate rule name {fields['name']!r}")
        if not any(fields.get(k) for k in RULE_MATCH_KEYS):
            raise ConfigError(f"{head}: rule {fields['name']!r} matches nothing: "
                              f"set one of {', '.join(RULE_MATCH_KEYS)}")
        names.add(fields["name"])
        rules.append(Rule(**fields))
    return tuple(rules)


# -- rendering ---------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def _comment(text: str, width: int = 78) -> list[str]:
    words, out, line = text.split(), [], "#"
    for word in words:
        if len(line) + 1 + len(word) > width:
            out.append(line)
            line = "#"
        line += " " + word
    out.append(line)
    return out


def render_default_toml() -> str:
    """The shipped /etc/guestagent/guestagent.toml: every key, commented out at its default."""
    out = ["# guestagent configuration. Every key is shown at its default, commented out;",
           "# uncomment and change what you need. See guestagent.toml(5).", ""]
    for section in sections():
        out.append(f"[{section}]")
        for key in (k for k in SCHEMA if k.section == section):
            out.extend(_comment(key.doc))
            out.append(f"#{key.name} = {toml_value(key.default)}")
            out.append("")
    out.append("# Rules mark tasks latency-sensitive. Each [[rule]] sets at least one of")
    out.append("# comm, cgroup, unit, exe; all that are set must match.")
    for key in RULE_KEYS:
        out.extend(_comment(f"{key.name}: {key.doc}" +
                            ("" if key.name == "name" or key.name in RULE_MATCH_KEYS
                             else f" Default: {toml_value(key.default)}.")))
    out.append("#")
    out.append("#[[rule]]")
    out.append('#name = "audio"')
    out.append('#unit = "pipewire*.service"')
    out.append('#sched = "fifo"')
    out.append("#priority = 70")
    out.append("#steer = true")
    return "\n".join(out) + "\n"


def render_config(config: Config) -> str:
    """A config as TOML, every key explicit: what `guestagent config dump` prints."""
    out = [f"# effective configuration from {config.source}"]
    for section in sections():
        out.append(f"\n[{section}]")
        for key in (k for k in SCHEMA if k.section == section):
            out.append(f"{key.name} = {toml_value(config.get(section, key.name))}")
    for rule in config.rules:
        out.append("\n[[rule]]")
        for key in RULE_KEYS:
            value = getattr(rule, key.name)
            if key.name in RULE_MATCH_KEYS and not value:
                continue
            out.append(f"{key.name} = {toml_value(value)}")
    return "\n".join(out) + "\n"

