"""`guestagent-host status`: the running peer's state as a JSON document.

The peer answers each connection to its status socket with one document and
closes it; building and formatting the document are pure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guestagent.display import escape, table
from guestagent.display import flag_names as _flag_names
from guestagent.documents import SCHEMA_VERSION, hint_json
from guestagent.errors import GuestagentError
from guestagent.host.decide import Plan
from guestagent.host.settings import ThreadSettings
from guestagent.linux.jsonlines import (
    JsonLineClient,
    JsonLineListener,
    LineTooLong,
    SocketInUse,
    encode_line,
)
from guestagent.linux.procfs import format_cpulist
from guestagent.protocol.model import AppliedFlag, VcpuCapacity

DEFAULT_STATUS_SOCKET = "/run/guestagent-host/status.sock"
MAX_DOCUMENT = 4 << 20

# Every counter the peer keeps, shown from zero so a consumer need not guess which exist.
COUNTERS = ("apply_failures", "bad_views", "link_errors", "rejected_hints")


def flag_names(flags: AppliedFlag) -> list[str]:
    return _flag_names(flags, AppliedFlag)


@dataclass(frozen=True)
class PeerSnapshot:
    """Everything status shows, captured by the peer loop."""

    pid: int
    link: str | None
    guest_state: str
    generation: int
    plan: Plan
    current: Mapping[int, ThreadSettings]  # as read back from the kernel
    tids: Mapping[int, int]
    published: Mapping[int, VcpuCapacity]
    counters: Mapping[str, int]
    dry_run: bool
    now: float
    link_state: str = "down"  # the link's own view: down, negotiating, up, refused
    link_reason: str = ""  # why it is not up, one line


def status_document(snap: PeerSnapshot) -> dict[str, Any]:
    plan = snap.plan
    vcpus = []
    for vcpu in sorted(plan.vcpus):
        p = plan.vcpus[vcpu]
        cur = snap.current.get(vcpu, p.settings)
        cap = snap.published.get(vcpu)
        hint = None
        if p.hint is not None:
            hint = {k: v for k, v in hint_json(p.hint).items() if k != "vcpu"}
        vcpus.append({
            "vcpu": vcpu,
            "tid": snap.tids.get(vcpu),
            "hint": hint,
            "applied": flag_names(p.applied),
            "policy": cur.describe().split(" cpus ")[0],
            "cpus": sorted(cur.affinity),
            "pcpu": cap.pcpu if cap else -1,
            "capacity": cap.capacity if cap else None,
            "host_load": cap.host_load if cap else None,
        })
    expires = plan.lease_expires
    counters = {name: 0 for name in COUNTERS}
    counters.update(snap.counters)
    return {
        "schema_version": SCHEMA_VERSION,
        "qemu_pid": snap.pid,
        "link": snap.link,
        "link_state": snap.link_state,
        "link_reason": snap.link_reason,
        "guest_state": snap.guest_state,
        "generation": snap.generation,
        "lease": plan.lease.value,
        "lease_remaining": round(expires - snap.now, 3) if expires is not None else None,
        "dry_run": snap.dry_run,
        "counters": dict(sorted(counters.items())),
        "vcpus": vcpus,
    }


def _hint_text(hint: Mapping[str, Any] | None) -> str:
    if not hint:
        return "-"
    if hint["request"] == "neutral":
        return "neutral"
    level = (f"{hint['class']} {hint['rt_priority']}"
             if hint["class"] in ("fifo", "rr", "deadline") else f"nice {hint['nice']}")
    return f"{hint['request']} {level}" + (f" g{hint['group']}" if hint.get("group") else "")


def format_status(doc: Mapping[str, Any]) -> str:
    """A table for people, every field escaped (a guest chooses some of them); --json
    gives the document itself."""
    remaining = doc.get("lease_remaining")
    lease = f"{doc.get('lease', '?')}" + (f" ({remaining:.1f}s left)"
                                          if remaining is not None and remaining > 0 else "")
    head = (f"qemu pid {doc.get('qemu_pid')}  link {doc.get('link') or 'none'}  "
            f"guest {doc.get('guest_state')}  generation {doc.get('generation')}  lease {lease}"
            + ("  DRY RUN" if doc.get("dry_run") else ""))
    lines = [escape(head)]
    if doc.get("link") and doc.get("link_state", "up") != "up":
        lines.append(escape(f"link {doc['link_state']}: {doc.get('link_reason', '')}"))
    rows = []
    for v in doc.get("vcpus", []):
        cap = v.get("capacity")
        cpus = v.get("cpus")
        rows.append((v["vcpu"], v.get("tid") or "-", _hint_text(v.get("hint")),
                     ",".join(v.get("applied") or []) or "-", v.get("policy", "-"),
                     format_cpulist(cpus) if isinstance(cpus, list) and cpus else "-",
                     v.get("pcpu", -1), "-" if cap is None else cap))
    lines.append(table(("VCPU", "TID", "HINT", "APPLIED", "POLICY", "CPUS", "PCPU",
                        "CAPACITY"), rows, right=(0, 1, 6, 7)))
    counters = doc.get("counters") or {}
    if any(counters.values()):
        lines.append(escape("counters: " + ", ".join(
            f"{k} {n}" for k, n in sorted(counters.items()))))
    return "\n".join(lines)


def listen(path: str) -> JsonLineListener:
    """The status socket, non-blocking; a stale socket file from a dead peer is replaced."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        return JsonLineListener(path, "status socket", mode=0o660, backlog=8)
    except SocketInUse:
        raise GuestagentError(f"{path}: another guestagent-host is already serving status") \
            from None


def answer(server: JsonLineListener, doc: Mapping[str, Any]) -> None:
    """Send the document to one waiting client; a client that misbehaves is dropped."""
    conn = server.accept()
    if conn is None:
        return
    with conn:
        conn.settimeout(1.0)
        try:
            conn.sendall(encode_line(doc))
        except OSError:
            pass


def fetch(path: str, timeout: float = 5.0) -> dict[str, Any]:
    try:
        with JsonLineClient(path, timeout, MAX_DOCUMENT) as client:
            line = client.read_line(partial=True)
    except (FileNotFoundError, ConnectionRefusedError):
        raise GuestagentError(f"{path}: no guestagent-host running "
                              "(or give its --status-socket)") from None
    except LineTooLong:
        raise GuestagentError(f"{path}: status document too large") from None
    except OSError as err:
        raise GuestagentError(f"{path}: {err.strerror or err}") from None
    try:
        doc = json.loads(line or b"")
    except ValueError:
        raise GuestagentError(f"{path}: malformed status document") from None
    if not isinstance(doc, dict):
        raise GuestagentError(f"{path}: malformed status document")
    return doc
