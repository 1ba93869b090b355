"""Co-location avoidance: vCPUs of one group on distinct physical CPUs (pure)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping


def assign_pcpus(
    groups: Mapping[int, int],
    candidates: Mapping[int, frozenset[int]],
    previous: Mapping[int, int],
) -> tuple[dict[int, int], frozenset[int]]:
    """Pin each grouped vCPU to a pCPU no other member of its group uses.

    groups: vCPU -> non-zero group; candidates: vCPU -> pCPUs it may be
    pinned to; previous: vCPU -> pCPU it is pinned to now (kept when still
    valid, so pins do not shuffle). Returns (vCPU -> pCPU, vCPUs that could not
    be separated). A vCPU that cannot get a distinct pCPU is left unpinned:
    pinning it onto a member's pCPU would make co-location certain.
    """
    members: dict[int, list[int]] = defaultdict(list)
    for vcpu, group in groups.items():
        if group:
            members[group].append(vcpu)
    pins: dict[int, int] = {}
    load: dict[int, int] = defaultdict(int)  # pins per pCPU, to spread groups apart
    colocated: set[int] = set()
    # Big groups first, most constrained vCPUs first: fewer dead ends for a greedy pass.
    for group in sorted(members, key=lambda g: (-len(members[g]), g)):
        vcpus = members[group]
        if len(vcpus) < 2:
            continue
        used: set[int] = set()
        for vcpu in sorted(vcpus, key=lambda v: (len(candidates.get(v, ())), v)):
            free = candidates.get(vcpu, frozenset()) - used
            if not free:
                colocated.add(vcpu)
                continue
            prev = previous.get(vcpu)
            pcpu = prev if prev in free else min(free, key=lambda c: (load[c], c))
            pins[vcpu] = pcpu
            used.add(pcpu)
            load[pcpu] += 1
    return pins, frozenset(colocated)
