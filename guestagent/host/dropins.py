"""Plain QEMU VMs (not libvirt's), one drop-in file each: /etc/guestagent-host/vms.d/NAME.toml.

    qmp = "/run/vm1/qmp.sock"          # QMP socket: QEMU's pid and vCPU threads
    channel = "/run/vm1/hints.sock"    # or: region = "/dev/shm/vm1-hints"
    listen = false                     # true: the chardev is server=off, we listen
    accel = "tcg"                      # optional; else asked of QEMU (query-kvm)
    iothreads = ["iothread0"]          # optional: -object iothread ids, boosted like the
                                       # emulator thread

`pid = N` or `pidfile = "PATH"` may stand in for `qmp` (vCPU threads are then
found by their names). The keys are a KeySpec schema, checked as the other
configs are: a file with an unknown key or a wrong type is skipped with one
line, `file:line: what`; the others are served. Parsing is pure; scan() reads
the directory.
"""

from __future__ import annotations

import os
import re
from typing import Any

from guestagent.errors import ConfigError
from guestagent.host.libvirt import ScanResult
from guestagent.host.vms import VmDescription
from guestagent.linux.schema import KeyLines, KeySpec, check_table, parse_document

DROPIN_DIR = "/etc/guestagent-host/vms.d"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MAX_DROPIN_SIZE = 1 << 16

SCHEMA: tuple[KeySpec, ...] = (
    KeySpec("", "qmp", "str", None, "QEMU's QMP unix socket: its pid and vCPU threads.",
            nonempty=True),
    KeySpec("", "pid", "int", None, "QEMU's pid, instead of qmp: vCPU threads are found by "
            "their names.", 1),
    KeySpec("", "pidfile", "str", None, "A file holding QEMU's pid, instead of qmp.",
            nonempty=True),
    KeySpec("", "channel", "str", None, "Unix socket of the VM's org.guestagent.hints.0 "
            "virtio-serial chardev.", nonempty=True),
    KeySpec("", "region", "str", None, "Backing file of the VM's ivshmem-plain region, "
            "instead of channel.", nonempty=True),
    KeySpec("", "listen", "bool", False, "true: the chardev is server=off and the service "
            "listens on channel."),
    KeySpec("", "accel", "choice", None, "The VM's accelerator; if not given, QEMU is asked "
            "(query-kvm).", choices=("tcg", "kvm")),
    KeySpec("", "iothreads", "list[str]", None, "QEMU ids of the VM's -object iothread "
            "threads, boosted like the emulator thread.", nonempty=True),
)
WAYS = ("qmp", "pid", "pidfile")  # how QEMU is found: exactly one
MAX_IOTHREADS = 64


class DropinError(ValueError):
    """A drop-in that cannot be used; str() is one line, `file:line: what`."""


def _pidfile(path: str) -> int:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read(64).strip())
    except (OSError, ValueError) as err:
        raise DropinError(f"pidfile {path}: {getattr(err, 'strerror', None) or 'no pid in it'}"
                          ) from None


def parse_dropin(name: str, text: str, source: str,
                 read_pidfile: Any = _pidfile) -> VmDescription:
    if not NAME.match(name):
        raise DropinError(f"{source}: {name!r} is not a VM name (letters, digits, '_.-', 1-64)")
    lines = KeyLines(text)
    try:
        doc = check_table(SCHEMA, "", parse_document(text, source), source, lines)
    except ConfigError as err:
        raise DropinError(str(err)) from None

    def refuse(key: str, what: str) -> DropinError:
        return DropinError(f"{source}:{lines.key('', key)}: {what}")

    for key, value in doc.items():
        if isinstance(value, str) and "\0" in value:
            raise refuse(key, f"{key} must not contain a NUL character")
    ids = doc.get("iothreads", [])
    if len(ids) > MAX_IOTHREADS or len(set(ids)) != len(ids) or not all(
            NAME.match(i) for i in ids):
        raise refuse("iothreads", "iothreads must be distinct iothread ids "
                     f"(letters, digits, '_.-'), at most {MAX_IOTHREADS}")
    if "channel" in doc and "region" in doc:
        raise refuse("region", "give channel or region, not both")
    if doc.get("listen") and "channel" not in doc:
        raise refuse("listen", "listen applies to a channel only")
    ways = [k for k in WAYS if k in doc]
    if len(ways) != 1:
        raise refuse(ways[-1] if ways else "", f"give exactly one of {', '.join(WAYS)}")
    pid = doc.get("pid")
    if "pidfile" in doc:
        try:
            pid = read_pidfile(doc["pidfile"])
        except DropinError as err:
            raise refuse("pidfile", str(err)) from None
    return VmDescription(
        name=f"dropin:{name}", source=source, pid=pid, channel=doc.get("channel"),
        channel_listen=bool(doc.get("listen", False)), region=doc.get("region"),
        qmp=doc.get("qmp"), accel=doc.get("accel", "unknown"), iothread_ids=tuple(ids))


def scan(directory: str = DROPIN_DIR) -> ScanResult:
    """Every usable drop-in in `directory` (none if it does not exist)."""
    vms, errors = [], []
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for entry in names:
        if not entry.endswith(".toml") or entry.startswith("."):
            continue
        path = os.path.join(directory, entry)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_DROPIN_SIZE + 1)
            if len(data) > MAX_DROPIN_SIZE:
                raise DropinError(f"{path}: larger than {MAX_DROPIN_SIZE} bytes")
            vms.append(parse_dropin(entry[:-len(".toml")], data.decode("utf-8"), path))
        except UnicodeDecodeError:
            errors.append(f"{path}: not UTF-8 text")
        except OSError as err:
            errors.append(f"{path}: {err.strerror or err}")
        except DropinError as err:
            errors.append(str(err))
    return ScanResult(tuple(vms), tuple(errors))
