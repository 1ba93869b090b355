"""The JSON shapes both commands share (docs/cli-json.md), so the guest's
`guestagent hints|capacity --json` and the host's `guestagent-host status --json`
describe a hint, a capacity entry and a set of flags the same way."""

from __future__ import annotations

from typing import Any

from guestagent.display import flag_names
from guestagent.protocol.model import AppliedFlag, HintFlag, VcpuCapacity, VcpuHint

SCHEMA_VERSION = 1


def hint_json(hint: VcpuHint) -> dict[str, Any]:
    return {"vcpu": hint.vcpu, "request": hint.request.name.lower(),
            "class": hint.sched_class.name.lower(), "rt_priority": hint.rt_priority,
            "nice": hint.nice, "flags": flag_names(hint.flags, HintFlag), "group": hint.group}


def capacity_entry(c: VcpuCapacity) -> dict[str, Any]:
    return {"vcpu": c.vcpu, "capacity": c.capacity, "pcpu": c.pcpu, "host_load": c.host_load,
            "applied": flag_names(c.applied, AppliedFlag),
            "acked_generation": c.acked_generation}
