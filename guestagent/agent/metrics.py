"""Prometheus text format for node_exporter's textfile collector.

``render`` is pure; ``write_atomically`` replaces the file with rename(2) so
the collector never reads half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence

from guestagent.protocol.model import VcpuCapacity, VcpuHint

FILENAME = "guestagent.prom"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str,
            samples: Iterable[tuple[Mapping[str, object], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {value:g}" for labels, value in samples]
    return lines


def render(hints: Sequence[VcpuHint], capacity: Sequence[VcpuCapacity] | None,
           sweep_seconds: float, sweeps: int, transport: str, link: str,
           errors: Mapping[str, int], generation: int) -> str:
    out: list[str] = []
    out += _family("guestagent_hint_request", "gauge",
                   "Request published per vCPU: 0 neutral, 1 boost, 2 unboost.",
                   (({"vcpu": h.vcpu}, int(h.request)) for h in hints))
    out += _family("guestagent_hint_rt_priority", "gauge",
                   "RT priority the vCPU's work needs (0 when not RT).",
                   (({"vcpu": h.vcpu, "class": h.sched_class.name.lower()}, h.rt_priority)
                    for h in hints))
    out += _family("guestagent_hint_group", "gauge",
                   "Co-location group of the vCPU (0: none).",
                   (({"vcpu": h.vcpu}, h.group) for h in hints))
    out += _family("guestagent_hint_generation", "counter",
                   "Generation of the hints last published.", [({}, generation)])
    if capacity:
        out += _family("guestagent_capacity", "gauge",
                       "Capacity the host reports per vCPU, 0..1024.",
                       (({"vcpu": c.vcpu}, c.capacity) for c in capacity))
    out += _family("guestagent_sweep_seconds", "gauge",
                   "Duration of the last observation sweep.", [({}, sweep_seconds)])
    out += _family("guestagent_sweeps_total", "counter",
                   "Observation sweeps since start.", [({}, sweeps)])
    out += _family("guestagent_transport_up", "gauge",
                   "1 when the link to the host is up.",
                   [({"transport": transport, "link": link}, 1 if link == "up" else 0)])
    out += _family("guestagent_errors_total", "counter", "Errors by kind since start.",
                   (({"kind": kind}, n) for kind, n in sorted(errors.items())))
    return "\n".join(out) + "\n"


def write_atomically(directory: str, text: str, name: str = FILENAME) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
