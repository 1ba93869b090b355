"""Transports: IO wrappers that move protocol bytes and report link state.

Links (guestagent.transport.link) are the API the agent daemon and the host
peer use; the per-backend modules hold the implementations.
"""

from guestagent.transport.channel_link import ChannelGuestLink, ChannelHostLink
from guestagent.transport.link import (
    ALL_FEATURES,
    GuestLink,
    GuestView,
    HostLink,
    HostView,
    LinkErrors,
    new_epoch,
)
from guestagent.transport.region_link import RegionGuestLink, RegionHostLink

__all__ = [
    "ALL_FEATURES", "ChannelGuestLink", "ChannelHostLink", "GuestLink", "GuestView", "HostLink",
    "HostView", "LinkErrors", "RegionGuestLink", "RegionHostLink", "new_epoch",
]
