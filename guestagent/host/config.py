"""Host limits: what the peer may grant a guest, from a strict TOML file.

Every key is optional; an unknown key, a wrong type or a value out of range
is an error naming the file and line, so a typo never silently widens a limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from guestagent.errors import ConfigError
from guestagent.linux.schema import KeyLines, syntax_error_line, tomllib
from guestagent.protocol.model import CAPACITY_MAX
from guestagent.sched import NICE_MAX, NICE_MIN, RT_PRIORITY_MAX, SCHED_FIFO, SCHED_RR

POLICY_BY_NAME = {"fifo": SCHED_FIFO, "rr": SCHED_RR}  # the RT policies a host may grant


@dataclass(frozen=True)
class HostLimits:
    """Limits on what one VM's guest may obtain; defaults suit a shared host."""

    max_rt_priority: int = 40  # below threaded IRQs (FIFO 50), so host interrupts still run
    rt_policies: tuple[int, ...] = (SCHED_FIFO, SCHED_RR)  # empty: no RT at all
    max_boosted: int = 2  # vCPUs of this VM boosted at once
    heartbeat_period: float = 1.0  # seconds between the guest's heartbeats
    lease_periods: float = 1.5  # a boost lasts this many heartbeat periods unless renewed
    pin_cpus: frozenset[int] | None = None  # None: the CPUs the peer may run on
    colocation: bool = True  # honour co-location groups by pinning
    honour_nice: bool = True  # apply nice levels from OTHER-class hints
    nice_floor: int = -10  # the most favourable nice granted
    honour_unboost: bool = True
    unboost_nice: int = 10  # nice for an unboost hint that names none
    min_change_interval: float = 0.1  # seconds between changes to one vCPU (flood limit)
    capacity_period: float = 1.0  # seconds between capacity publications
    contend: Mapping[int, int] = field(default_factory=dict)  # vCPU -> reported capacity

    @property
    def lease(self) -> float:
        return self.heartbeat_period * self.lease_periods


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and not isinstance(v, bool)


def _check(key: str, value: Any) -> Any:
    """Validate one key's raw TOML value; return the HostLimits value or raise ValueError."""
    if key == "max_rt_priority":
        if not _is_int(value) or not 1 <= value <= RT_PRIORITY_MAX:
            raise ValueError(f"must be an integer 1..{RT_PRIORITY_MAX}")
        return value
    if key == "rt_policies":
        if not isinstance(value, list) or any(v not in POLICY_BY_NAME for v in value):
            raise ValueError('must be a list of "fifo", "rr"')
        return tuple(dict.fromkeys(POLICY_BY_NAME[v] for v in value))
    if key == "max_boosted":
        if not _is_int(value) or value < 0:
            raise ValueError("must be an integer >= 0")
        return value
    if key in ("heartbeat_period", "capacity_period"):
        if not _number(value) or not 0.01 <= value <= 3600:
            raise ValueError("must be a number of seconds, 0.01..3600")
        return float(value)
    if key == "min_change_interval":
        if not _number(value) or not 0 <= value <= 60:
            raise ValueError("must be a number of seconds, 0..60")
        return float(value)
    if key == "lease_periods":
        # Above 2 a silent guest could hold a vCPU at RT past the promised revert.
        if not _number(value) or not 0 < value <= 2:
            raise ValueError("must be a number in (0, 2]")
        return float(value)
    if key == "pin_cpus":
        if not isinstance(value, list) or not all(_is_int(v) and 0 <= v < 4096 for v in value):
            raise ValueError("must be a list of CPU numbers")
        return frozenset(value)
    if key in ("colocation", "honour_nice", "honour_unboost"):
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if key in ("nice_floor", "unboost_nice"):
        if not _is_int(value) or not NICE_MIN <= value <= NICE_MAX:
            raise ValueError(f"must be an integer {NICE_MIN}..{NICE_MAX}")
        return value
    if key == "contend":
        if not isinstance(value, dict):
            raise ValueError("must be a table of vCPU = capacity")
        out = {}
        for k, v in value.items():
            if not k.isdigit() or not _is_int(v) or not 0 <= v <= CAPACITY_MAX:
                raise ValueError(f"entry {k!r}: must be vCPU number = capacity 0..{CAPACITY_MAX}")
            out[int(k)] = v
        return out
    raise ValueError("unknown key")


KEYS = frozenset(f.name for f in fields(HostLimits))


def parse_limits(text: str, path: str = "<config>",
                 tables: frozenset[str] = frozenset()) -> HostLimits:
    """Parse a host config file's text; errors name path:line. Keys in `tables` belong
    to another reader (the service's [host] table) and are skipped here."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = str(err).split(" (at ")[0]
        raise ConfigError(f"{path}:{syntax_error_line(text)}: {msg}") from None
    lines = KeyLines(text)
    values = {}
    for key, raw in doc.items():
        if key in tables:
            continue
        try:
            if key not in KEYS:
                raise ValueError("unknown key")
            values[key] = _check(key, raw)
        except ValueError as err:
            raise ConfigError(f"{path}:{lines.table(key)}: {key}: {err}") from None
    return replace(HostLimits(), **values)


def read_config_text(path: str) -> str:
    """A config file's text; ConfigError (one line) if it cannot be read as UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def load_limits(path: str | None) -> HostLimits:
    if path is None:
        return HostLimits()
    return parse_limits(read_config_text(path), path)
