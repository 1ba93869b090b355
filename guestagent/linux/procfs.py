"""Parsers for the kernel's /proc text formats, with named fields.

Nothing here opens a file: each function takes the bytes or text the kernel
gave and returns plain values, so the same code serves the guest's observer,
the host service and recorded trees, and malformed input is testable alone.
It knows nothing of guests or hosts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# /proc/<pid>/stat field positions counted after the closing ')' of comm
# (man 5 proc numbers fields from 1; field 3 "state" is index 0 here).
_STATE, _FLAGS, _UTIME, _STIME, _NICE = 0, 6, 11, 12, 16
_START_TIME, _PROCESSOR, _RT_PRIORITY, _POLICY = 19, 36, 37, 38

PF_KTHREAD = 0x00200000
PF_NO_SETAFFINITY = 0x04000000  # per-CPU kernel threads: affinity is fixed by the kernel


class ParseError(ValueError):
    """The kernel text did not have the expected shape."""


def decode_comm(raw: bytes) -> str:
    """comm is up to 15 arbitrary bytes: keep them all, readable, and JSON-safe."""
    return raw.decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class StatFields:
    """The parts of /proc/<pid>/task/<tid>/stat the observer uses."""

    comm: str
    state: str
    flags: int
    nice: int
    last_cpu: int
    rt_priority: int
    policy: int
    cpu_ticks: int = 0  # utime + stime, in clock ticks
    start_time: int = 0  # clock ticks after boot: tells a recycled id apart


def parse_stat(raw: bytes) -> StatFields:
    """Parse a stat line; comm may hold spaces, parentheses, newlines, any bytes.

    comm sits between the first '(' and the *last* ')', so split there.
    """
    start = raw.find(b"(")
    end = raw.rfind(b")")
    if start < 0 or end < start:
        raise ParseError("stat line has no (comm)")
    fields = raw[end + 1:].split()
    if len(fields) <= _POLICY:
        raise ParseError(f"stat line has {len(fields) + 2} fields, expected at least 41")
    try:
        return StatFields(
            comm=decode_comm(raw[start + 1:end]),
            state=fields[_STATE].decode("ascii", "replace"),
            flags=int(fields[_FLAGS]),
            nice=int(fields[_NICE]),
            last_cpu=int(fields[_PROCESSOR]),
            rt_priority=int(fields[_RT_PRIORITY]),
            policy=int(fields[_POLICY]),
            cpu_ticks=int(fields[_UTIME]) + int(fields[_STIME]),
            start_time=int(fields[_START_TIME]),
        )
    except ValueError as err:
        raise ParseError(f"stat line has a non-numeric field: {err}") from None


def parse_cpulist(text: str) -> frozenset[int]:
    """'0-3,8,10-11' (the kernel's cpulist format; '' for none) -> {0,1,2,3,8,10,11}."""
    cpus: set[int] = set()
    text = text.strip()
    if not text or text == "(null)":
        return frozenset()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                hi, _, stride = hi.partition(":")  # isolcpus also allows a-b:n/m; keep a-b
                first, last = int(lo), int(hi)
                if last < first:
                    raise ParseError(f"bad cpu range {part!r}")
                cpus.update(range(first, last + 1))
            else:
                cpus.add(int(lo))
        except ValueError:
            raise ParseError(f"bad cpu list {text!r}") from None
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """{0,1,2,5} -> '0-2,5', the inverse of parse_cpulist."""
    out: list[str] = []
    run: list[int] = []
    for cpu in sorted(set(cpus)):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            out.append(_run_text(run))
        run = [cpu]
    if run:
        out.append(_run_text(run))
    return ",".join(out)


def _run_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def parse_status_cpus(text: str) -> frozenset[int]:
    """Cpus_allowed_list from /proc/<pid>/task/<tid>/status."""
    for line in text.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpulist(line.split(":", 1)[1])
    raise ParseError("status has no Cpus_allowed_list")


def parse_sched_dl(text: str) -> tuple[int, int, int]:
    """(runtime, deadline, period) in ns from /proc/<pid>/task/<tid>/sched (DEADLINE tasks)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in ("dl.runtime", "dl.deadline", "dl.period"):
            try:
                values[key] = int(value.strip().split(".")[0])
            except ValueError:
                raise ParseError(f"bad {key} in sched") from None
    return values.get("dl.runtime", 0), values.get("dl.deadline", 0), values.get("dl.period", 0)


def parse_cgroup(text: str) -> str:
    """The cgroup path of a process: the v2 ('0::') line, else systemd's v1 hierarchy."""
    fallback = ""
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            return path
        if controllers == "name=systemd" or (not fallback and path):
            fallback = path
    return fallback


_UNIT_RE = re.compile(r"[^/]+\.(service|scope|slice|socket|mount|swap)$")


def systemd_unit(cgroup: str) -> str:
    """The innermost systemd unit in a cgroup path ('' when none), e.g.
    '/system.slice/chronyd.service' -> 'chronyd.service'."""
    for part in reversed(cgroup.split("/")):
        if _UNIT_RE.match(part) and not part.endswith(".slice"):
            return part
    for part in reversed(cgroup.split("/")):
        if part.endswith(".slice"):
            return part
    return ""


@dataclass(frozen=True)
class InterruptLine:
    """One numbered line of /proc/interrupts."""

    irq: int
    counts: tuple[int, ...]  # index = cpu number; CPUs missing from the header count 0
    chip: str
    hwirq: str
    actions: tuple[str, ...]


_HWIRQ_RE = re.compile(r"^\d+(-\S+)?$")


def parse_interrupts(text: str) -> tuple[list[InterruptLine], int]:
    """Parse /proc/interrupts; returns (numbered lines, malformed lines skipped).

    The header names the online CPUs only ('CPU0 CPU2' when CPU1 is offline),
    so counts are placed by the header's CPU numbers, not by column.
    Arch counters (NMI, LOC, ...) are not IRQ numbers and are left out.
    """
    lines = text.splitlines()
    if not lines:
        raise ParseError("/proc/interrupts is empty")
    try:
        cpus = [int(tok[3:]) for tok in lines[0].split() if tok.startswith("CPU")]
    except ValueError:
        raise ParseError("/proc/interrupts header is not 'CPU<n> ...'") from None
    if not cpus:
        raise ParseError("/proc/interrupts header names no CPUs")
    width = max(cpus) + 1
    out: list[InterruptLine] = []
    skipped = 0
    for line in lines[1:]:
        label, sep, rest = line.partition(":")
        label = label.strip()
        if not sep or not label.isdigit():
            continue
        toks = rest.split()
        try:
            values = [int(t) for t in toks[:len(cpus)]]
        except ValueError:
            skipped += 1
            continue
        if len(values) < len(cpus):
            skipped += 1
            continue
        counts = [0] * width
        for cpu, value in zip(cpus, values):
            counts[cpu] = value
        tail = toks[len(cpus):]
        chip = tail[0] if tail else ""
        i = 1
        hwirq = ""
        if len(tail) > i and _HWIRQ_RE.match(tail[i]):
            hwirq = tail[i]
            i += 1
            if len(tail) > i and tail[i] in ("Level", "Edge"):  # GENERIC_IRQ_SHOW_LEVEL arches
                hwirq = f"{hwirq} {tail[i]}"
                i += 1
        rest_text = " ".join(tail[i:])
        actions = tuple(a.strip() for a in rest_text.split(", ") if a.strip())
        out.append(InterruptLine(int(label), tuple(counts), chip, hwirq, actions))
    return out, skipped


@dataclass(frozen=True)
class CpuTimes:
    """One CPU's line of /proc/stat, in clock ticks."""

    busy: int  # user + nice + system + irq + softirq (guest time is inside user)
    nice: int  # user time of positively niced tasks
    steal: int
    idle: int = 0  # idle + iowait

    @property
    def total(self) -> int:
        """Every tick the line accounts for (busy + steal + idle)."""
        return self.busy + self.steal + self.idle


def parse_proc_stat_times(text: str) -> dict[int, CpuTimes]:
    """Per-CPU times from /proc/stat (online CPUs only)."""
    out: dict[int, CpuTimes] = {}
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        toks = line.split()
        try:
            cpu = int(toks[0][3:])
            user, nice, system, idle, iowait, irq, softirq = (int(t) for t in toks[1:8])
            steal = int(toks[8]) if len(toks) > 8 else 0
        except (ValueError, IndexError):
            raise ParseError(f"/proc/stat line {toks[0]!r} is malformed") from None
        out[cpu] = CpuTimes(user + nice + system + irq + softirq, nice, steal, idle + iowait)
    return out


def parse_proc_stat_steal(text: str) -> dict[int, int]:
    """Per-CPU steal time in clock ticks from /proc/stat (online CPUs only)."""
    return {cpu: t.steal for cpu, t in parse_proc_stat_times(text).items()}


def parse_mountinfo_cgroup2(text: str) -> str | None:
    """Mount point of the cgroup v2 hierarchy, or None (v1-only systems)."""
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if sep and post.split()[:1] == ["cgroup2"]:
            fields = pre.split()
            if len(fields) >= 5:
                return fields[4].replace("\\040", " ")
    return None
