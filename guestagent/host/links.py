"""Open the transport link the guest uses (guestagent.transport)."""

from __future__ import annotations

from guestagent.errors import GuestagentError
from guestagent.transport import ChannelHostLink, HostLink, RegionHostLink

# How often the peer looks at the region for a new hint table. The region has no fd
# to wait on, so this bounds the latency of a boost; 20 ms cost under 1% of a CPU here.
REGION_POLL_INTERVAL = 0.02


def open_host_link(channel: str | None, region: str | None, listen: bool = False,
                   heartbeat_period: float = 1.0) -> HostLink:
    """A HostLink for the virtio-serial chardev socket or the ivshmem backing file.

    Neither opens anything yet: the channel link connects (or listens) with back-off,
    and the region link maps the file on its first tick, retrying with back-off while
    QEMU has not created it, and waits for the guest to format it.
    """
    if channel is not None:
        return ChannelHostLink(channel, listen=listen, heartbeat_period=heartbeat_period)
    if region is None:
        raise GuestagentError("no transport: give --channel SOCK or --region FILE")
    if listen:
        raise GuestagentError("--listen applies to --channel only; QEMU and the peer both "
                              "map the --region file")
    return RegionHostLink(region, poll_interval=min(REGION_POLL_INTERVAL, heartbeat_period),
                          heartbeat_period=heartbeat_period)
