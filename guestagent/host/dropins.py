"""Plain QEMU VMs (not libvirt's), one drop-in file each: /etc/guestagent-host/vms.d/NAME.toml.

    qmp = "/run/vm1/qmp.sock"          # QMP socket: QEMU's pid and vCPU threads
    channel = "/run/vm1/hints.sock"    # or: region = "/dev/shm/vm1-hints"
    listen = false                     # true: the chardev is server=off, we listen
    accel = "tcg"                      # optional; else asked of QEMU (query-kvm)
    iothreads = ["iothread0"]          # optional: -object iothread ids, boosted like the
                                       # emulator thread

`pid = N` or `pidfile = "PATH"` may stand in for `qmp` (vCPU threads are then
found by their names). A file with an unknown key or a wrong type is skipped
with a one-line error naming it; the others are served. Parsing is pure;
scan() reads the directory.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from guestagent.host.libvirt import ScanResult
from guestagent.host.vms import VmDescription

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

DROPIN_DIR = "/etc/guestagent-host/vms.d"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MAX_DROPIN_SIZE = 1 << 16
KEYS = {"qmp": str, "pid": int, "pidfile": str, "channel": str, "region": str,
        "listen": bool, "accel": str, "iothreads": list}


class DropinError(ValueError):
    """A drop-in that cannot be used; str() is one line."""


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
        raise DropinError(f"{name!r} is not a VM name (letters, digits, '_.-', 1-64)")
    try:
        doc: Mapping[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise DropinError(str(err).split(" (at ")[0]) from None
    for key, value in doc.items():
        want = KEYS.get(key)
        if want is None:
            raise DropinError(f"{key}: unknown key")
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise DropinError(f"{key}: must be {want.__name__}")
        if want is str and (not value or "\0" in value):
            raise DropinError(f"{key}: must be a non-empty path")
    ids = doc.get("iothreads", [])
    if len(ids) > 64 or not all(isinstance(i, str) and NAME.match(i) for i in ids) or len(
            set(ids)) != len(ids):
        raise DropinError("iothreads: must be distinct iothread ids (letters, digits, '_.-')")
    if "channel" in doc and "region" in doc:
        raise DropinError("give channel or region, not both")
    if doc.get("listen") and "channel" not in doc:
        raise DropinError("listen applies to a channel only")
    if doc.get("accel", "tcg") not in ("tcg", "kvm"):
        raise DropinError('accel: must be "tcg" or "kvm"')
    ways = [k for k in ("qmp", "pid", "pidfile") if k in doc]
    if len(ways) != 1:
        raise DropinError("give exactly one of qmp, pid, pidfile")
    pid = doc.get("pid")
    if pid is not None and pid <= 0:
        raise DropinError("pid: must be positive")
    if "pidfile" in doc:
        pid = read_pidfile(doc["pidfile"])
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
                raise DropinError(f"larger than {MAX_DROPIN_SIZE} bytes")
            vms.append(parse_dropin(entry[:-len(".toml")], data.decode("utf-8"), path))
        except UnicodeDecodeError:
            errors.append(f"{path}: not UTF-8 text")
        except OSError as err:
            errors.append(f"{path}: {err.strerror or err}")
        except DropinError as err:
            errors.append(f"{path}: {err}")
    return ScanResult(tuple(vms), tuple(errors))
