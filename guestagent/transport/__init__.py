"""Transports: IO wrappers that move protocol bytes and report link state.

Links (guestagent.transport.link) are the API the agent daemon and the host
peer use; the per-backend modules hold the implementations.
"""

import types as _types

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

# The surface is exactly what is imported above.
__all__ = sorted(name for name, value in globals().items()
                 if not name.startswith("_") and not isinstance(value, _types.ModuleType))
