"""A VM as the host service knows it: what to attach to, wherever it was found.

libvirt's status files (libvirt.py) and the operator's drop-in files
(dropins.py) both reduce to a VmDescription, a frozen value compared as a
whole: when a VM's description changes (a vCPU hot-plugged, QEMU restarted
under the same name), the service re-attaches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

HINTS_CHANNEL = "org.guestagent.hints.0"


@dataclass(frozen=True)
class VmDescription:
    name: str  # unique among the VMs one service serves; "libvirt:NAME" or "dropin:NAME"
    source: str  # "libvirt" or "dropin", and the file it came from, for messages
    pid: int | None  # QEMU's pid (its main thread is the emulator thread)
    vcpus: tuple[tuple[int, int], ...] = ()  # (vCPU index, tid); empty: find by thread name
    channel: str | None = None  # unix socket of the org.guestagent.hints.0 chardev
    channel_listen: bool = False  # the chardev connects to us (server=off)
    region: str | None = None  # backing file of the ivshmem-plain region
    qmp: str | None = None  # QMP socket, when we may use it (never libvirt's)
    accel: str = "unknown"  # "tcg", "kvm" or "unknown": decides the emulator default
    iothread_ids: tuple[str, ...] = ()  # QEMU iothread object ids, boosted like the emulator

    @property
    def served(self) -> bool:
        """Has a hints transport: the service attaches; otherwise it is only listed."""
        return self.channel is not None or self.region is not None

    def vcpu_tids(self) -> Mapping[int, int]:
        return dict(self.vcpus)

    def transport(self) -> str:
        return "channel" if self.channel else "region" if self.region else "none"
