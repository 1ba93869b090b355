"""Open the transport link the guest uses (guestagent.transport)."""

from __future__ import annotations

from guestagent.errors import GuestagentError
from guestagent.transport import HostLink


def open_host_link(channel: str | None, region: str | None, listen: bool = False,
                   heartbeat_period: float = 1.0) -> HostLink:
    """A HostLink for the virtio-serial chardev socket or the ivshmem backing file."""
    if channel is not None:
        from guestagent.transport import ChannelHostLink
        return ChannelHostLink(channel, listen=listen, heartbeat_period=heartbeat_period)
    try:
        from guestagent.transport import RegionHostLink  # type: ignore[attr-defined]
    except ImportError:
        raise GuestagentError("this build has no region host link; use --channel") from None
    return RegionHostLink(region)
