"""Which transport the agent talks to the host through, chosen at run time.

auto: the ivshmem region if present (or the configured region file), else
the virtio-serial port, else a local region file so the agent and its CLI
work on any machine. The choice is made again when devices come or go.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from guestagent.errors import GuestagentError
from guestagent.transport.channel_link import ChannelGuestLink
from guestagent.transport.link import GuestLink
from guestagent.transport.region import find_ivshmem
from guestagent.transport.region_link import RegionGuestLink
from guestagent.transport.stream import resolve_port

RANK = {"region": 0, "channel": 1, "local": 2}  # lower is preferred


@dataclass(frozen=True)
class Choice:
    kind: str  # "region" | "channel" | "local"
    target: str  # region path, "ivshmem", port path or socket path


def available(transport: Mapping[str, Any]) -> list[Choice]:
    """The transports present now, best first, that the configured mode allows."""
    mode = transport["mode"]
    found: list[Choice] = []
    if mode in ("auto", "region"):
        if transport["region_path"]:
            if os.path.exists(transport["region_path"]):
                found.append(Choice("region", transport["region_path"]))
        elif find_ivshmem():
            found.append(Choice("region", "ivshmem"))
    if mode in ("auto", "channel"):
        try:
            port = resolve_port(transport["port_name"])
        except GuestagentError:
            port = ""
        if port and os.path.exists(port):  # a path is taken as given: check it is there
            found.append(Choice("channel", port))
    if mode in ("auto", "local"):
        found.append(Choice("local", transport["local_region"]))
    return found


def open_link(choice: Choice, nr_vcpus: int, heartbeat_period: float) -> GuestLink:
    """Open the link for a choice; GuestagentError with a one-line reason if it fails."""
    if choice.kind == "channel":
        return ChannelGuestLink(choice.target, nr_vcpus, heartbeat_period=heartbeat_period)
    create = choice.kind == "local"
    if create:
        os.makedirs(os.path.dirname(choice.target) or ".", mode=0o755, exist_ok=True)
    # The host's lines (capacity, its heartbeat) change about once a heartbeat
    # period: reading them four times a period is prompt enough, and the reads
    # were half of an idle agent's CPU time at ten a second.
    return RegionGuestLink(choice.target, nr_vcpus, create=create,
                           heartbeat_period=heartbeat_period,
                           poll_interval=max(0.1, heartbeat_period / 4))
