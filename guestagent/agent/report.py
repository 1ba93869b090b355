"""Hints, capacity and agent state as JSON-ready dicts and as aligned text tables.

The dicts are the `--json` schema of `guestagent status|hints|capacity`
(docs/cli-json.md); the daemon sends them over the control socket and the CLI
prints them, so both ways of asking give the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from guestagent.agent.policy import Decision, VcpuDecision
from guestagent.protocol.model import HintFlag, Request, VcpuCapacity, VcpuHint

SCHEMA_VERSION = 1


def flag_names(flags: int, kind: type = HintFlag) -> list[str]:
    return [f.name.lower() for f in kind if f.value and flags & f.value]


def hint_json(hint: VcpuHint) -> dict:
    return {"vcpu": hint.vcpu, "request": hint.request.name.lower(),
            "class": hint.sched_class.name.lower(), "rt_priority": hint.rt_priority,
            "nice": hint.nice, "flags": flag_names(hint.flags), "group": hint.group}


def decision_json(d: VcpuDecision) -> dict:
    out = hint_json(d.hint)
    out["reasons"] = list(d.reasons)
    if d.wanted != d.hint:
        out["wanted"] = hint_json(d.wanted)
        out["held_until_s"] = d.held_until
    return out


def hints_json(decision: Decision, generation: int, now: float) -> dict:
    vcpus = []
    for d in decision.vcpus:
        entry = decision_json(d)
        if d.held_until is not None:
            entry["held_until_s"] = round(max(0.0, d.held_until - now), 3)
        vcpus.append(entry)
    return {"schema_version": SCHEMA_VERSION, "generation": generation, "vcpus": vcpus}


def capacity_json(caps: Sequence[VcpuCapacity] | None, age: float | None) -> dict:
    from guestagent.protocol.model import AppliedFlag

    return {"schema_version": SCHEMA_VERSION, "known": caps is not None,
            "age_s": None if age is None else round(age, 3),
            "vcpus": [{"vcpu": c.vcpu, "capacity": c.capacity, "pcpu": c.pcpu,
                       "host_load": c.host_load, "applied": flag_names(c.applied, AppliedFlag),
                       "acked_generation": c.acked_generation} for c in caps or ()]}


def describe_need(h: dict) -> str:
    if h["request"] == Request.BOOST.name.lower():
        if h["class"] in ("fifo", "rr", "deadline"):
            return f"boost {h['class']} {h['rt_priority']}"
        return f"boost nice {h['nice']}"
    return h["request"]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def hints_table(data: dict) -> str:
    rows = []
    for h in data["vcpus"]:
        held = ""
        if "wanted" in h:
            held = f" (held {h.get('held_until_s', 0):.1f}s, wants {describe_need(h['wanted'])})"
        rows.append((h["vcpu"], describe_need(h) + held, ",".join(h["flags"]) or "-",
                     h["group"] or "-", "; ".join(h["reasons"]) or "-"))
    return table(("VCPU", "HINT", "FLAGS", "GROUP", "REASONS"), rows)


def capacity_table(data: dict) -> str:
    if not data["known"]:
        return "no capacity from the host"
    rows = [(c["vcpu"], c["capacity"], c["pcpu"] if c["pcpu"] >= 0 else "-",
             c["host_load"] if c["host_load"] >= 0 else "-", ",".join(c["applied"]) or "-",
             c["acked_generation"]) for c in data["vcpus"]]
    return table(("VCPU", "CAPACITY", "PCPU", "HOST_LOAD", "APPLIED", "ACKED"), rows)
