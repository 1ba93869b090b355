"""Open the transport link the guest uses (guestagent.transport)."""

from __future__ import annotations

from guestagent.errors import GuestagentError


def open_host_link(channel: str | None, region: str | None):
    """A HostLink for the virtio-serial chardev socket or the ivshmem backing file."""
    try:
        from guestagent import transport
        cls = transport.ChannelHostLink if channel is not None else transport.RegionHostLink
    except (ImportError, AttributeError):
        raise GuestagentError("this build has no host transport links yet") from None
    return cls(channel if channel is not None else region)
