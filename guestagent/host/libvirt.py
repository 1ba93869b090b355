"""libvirt domains from libvirt's own status files, without a libvirt binding.

libvirtd keeps one status document per running QEMU domain in
/run/libvirt/qemu/NAME.xml: the QEMU pid, every vCPU's thread id, the live
domain XML with each channel's socket path and each shmem's name. That is all
the service needs, and more than the public API gives: libvirt has no call that
returns thread ids. So the service reads these files (replaced by rename when
libvirt updates them, removed when the domain stops) and needs no binding,
no connection to libvirtd and no permission beyond reading /run.

Parsing is pure; scan() reads the directory.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass

from guestagent.host.vms import HINTS_CHANNEL, VmDescription

STATUS_DIR = "/run/libvirt/qemu"
MAX_STATUS_SIZE = 8 << 20  # a status file is tens of KiB; refuse anything absurd


class StatusError(ValueError):
    """A status file that does not describe a running domain; str() is one line."""


def _positive(text: str | None, what: str) -> int:
    try:
        value = int(text or "")
    except ValueError:
        raise StatusError(f"{what}: {text!r} is not a number") from None
    if value <= 0:
        raise StatusError(f"{what}: {value} is not a pid")
    return value


def _shm_path(name: str) -> str | None:
    # libvirt backs <shmem name='X'> with /dev/shm/X; a name with a slash names no file there.
    if not name or "/" in name or name in (".", ".."):
        return None
    return f"/dev/shm/{name}"


def parse_status(text: str, source: str = "<status>") -> VmDescription:
    """The VM a libvirt status document describes; StatusError if it is not a live domain."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise StatusError(f"not XML: {err}") from None
    if root.tag != "domstatus":
        raise StatusError(f"root element <{root.tag}>, expected <domstatus>")
    pid = _positive(root.get("pid"), "domstatus pid")
    vcpus = []
    for el in root.findall("./vcpus/vcpu"):
        try:
            vcpu = int(el.get("id", ""))
        except ValueError:
            continue
        if vcpu >= 0 and el.get("pid"):
            vcpus.append((vcpu, _positive(el.get("pid"), f"vcpu {vcpu} pid")))
    domain = root.find("domain")
    if domain is None:
        raise StatusError("no <domain> inside <domstatus>")
    name = (domain.findtext("name") or "").strip()
    if not name:
        raise StatusError("domain has no <name>")
    accel = {"qemu": "tcg", "kvm": "kvm"}.get(domain.get("type", ""), "unknown")
    channel = None
    for el in domain.findall("./devices/channel"):
        target, src = el.find("target"), el.find("source")
        if (el.get("type") == "unix" and target is not None and src is not None
                and target.get("name") == HINTS_CHANNEL and src.get("path")):
            channel = src.get("path")
            break
    region = None
    for el in domain.findall("./devices/shmem"):
        model = el.find("model")
        if model is not None and model.get("type") == "ivshmem-plain":
            region = _shm_path(el.get("name", ""))
            if region:
                break
    # libvirt keeps no iothread tids in the status file: it starts QEMU with
    # `-object iothread,id=iothreadN` (and debug-threads=on), found later by name.
    ids = [el.get("id", "") for el in domain.findall("./iothreadids/iothread")]
    if not ids:
        try:
            count = int((domain.findtext("iothreads") or "0").strip())
        except ValueError:
            count = 0
        ids = [str(i) for i in range(1, min(max(count, 0), 64) + 1)]
    iothreads = tuple(f"iothread{i}" for i in ids if i.isdigit())
    return VmDescription(
        name=f"libvirt:{name}", source=source, pid=pid, vcpus=tuple(sorted(vcpus)),
        channel=channel, region=region if channel is None else None, accel=accel,
        iothread_ids=iothreads)


@dataclass(frozen=True)
class ScanResult:
    vms: tuple[VmDescription, ...]
    errors: tuple[str, ...]  # one line per file that could not be used


def _read_small(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_STATUS_SIZE + 1)
    if len(data) > MAX_STATUS_SIZE:
        raise StatusError(f"larger than {MAX_STATUS_SIZE} bytes")
    return data.decode("utf-8", errors="replace")


def status_files(directory: str) -> Iterator[str]:
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        if name.endswith(".xml") and not name.startswith("."):
            yield os.path.join(directory, name)


def scan(directory: str = STATUS_DIR) -> ScanResult:
    """Every running libvirt QEMU domain; a directory that does not exist has none."""
    vms, errors = [], []
    for path in status_files(directory):
        try:
            vms.append(parse_status(_read_small(path), path))
        except FileNotFoundError:
            continue  # the domain stopped while we looked
        except (OSError, StatusError) as err:
            errors.append(f"{path}: {getattr(err, 'strerror', None) or err}")
    return ScanResult(tuple(vms), tuple(errors))
