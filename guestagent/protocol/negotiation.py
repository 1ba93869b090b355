"""The host's decision on a guest's offer, shared by the region and the channel."""

from __future__ import annotations

from dataclasses import dataclass

from guestagent.protocol.model import PROTOCOL_NAME, VERSION_MAJOR, Feature

__all__ = ["Negotiated", "negotiate"]


@dataclass(frozen=True)
class Negotiated:
    accepted: bool
    features: Feature  # in use for the session: guest's AND host's
    reason: str = ""  # one line, set when refused


def negotiate(protocol: str, major: int, minor: int, guest_features: Feature,
              host_features: Feature) -> Negotiated:
    """Accept any minor of our major; refuse another protocol or major cleanly."""
    if protocol != PROTOCOL_NAME:
        return Negotiated(False, Feature.NONE,
                          f"protocol {protocol[:64]!r} is not {PROTOCOL_NAME}")
    if major != VERSION_MAJOR:
        return Negotiated(False, Feature.NONE,
                          f"version {major}.{minor} not supported (host speaks {VERSION_MAJOR}.x)")
    return Negotiated(True, Feature(guest_features & host_features))
