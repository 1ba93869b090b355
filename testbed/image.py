"""Debian guest images with systemd as PID 1, for tests that need a real init.

``build_image()`` makes a Debian 12 root file system with mmdebstrap (minbase
plus systemd, udev, cloud-init, python3-pyudev, rt-tests and both Debian
kernels, stock and PREEMPT_RT, so each kernel finds its modules), turns it into
an ext4 image with ``mke2fs -d`` (no loop device, no mount) and copies the
kernels and initrds beside it for ``-kernel``/``-initrd`` boots. The result is
cached outside the repository, keyed on a hash of everything that went into
it, so a rerun costs seconds and a clean clone on the same machine reuses it.

The image carries two test fixtures, nothing else of this project:
``guest_ctl.py`` as a service on the virtio port ``org.guestagent.test.ctl``
(so tests can run commands in the guest), and an fstab line that mounts a disk
labelled ``garepo`` (the local apt repository) read-only when one is attached.
The guest has no network: the apt sources are removed and cloud-init only
looks for a NoCloud seed.

Also here: the local apt repository disk holding .debs built from the tree,
the NoCloud seed disk, and a variant of the image with a .deb preinstalled.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from testbed.vm import CTL_PORT, GUEST_CTL

# Bump when the build steps change in a way the recipe below does not show.
RECIPE_VERSION = 1
SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv", "udev", "python3", "python3-pyudev", "cloud-init", "rt-tests",
    "linux-image-amd64", "linux-image-rt-amd64", "procps",
)
ROOT_SIZE = "3G"  # sparse; leaves room for apt to install and upgrade in the guest
REPO_MOUNT = "/srv/guestagent-repo"
REPO_LABEL = "garepo"
CTL_SERVICE = "guestagent-testbed-ctl.service"
TOOLS = {"mmdebstrap": "mmdebstrap", "mke2fs": "e2fsprogs",
         "dpkg-scanpackages": "dpkg-dev", "genisoimage": "genisoimage"}

CTL_UNIT = f"""\
[Unit]
Description=guestagent test harness: command server on {CTL_PORT}
After=systemd-udevd.service

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/guestagent-testbed/guest_ctl.py {CTL_PORT}
Restart=always
RestartSec=1s

[Install]
WantedBy=multi-user.target
"""
FSTAB = f"""\
/dev/vda / ext4 rw,errors=remount-ro 0 1
LABEL={REPO_LABEL} {REPO_MOUNT} ext4 ro,nofail,x-systemd.device-timeout=10s 0 2
"""
CLOUD_CFG = """\
# Test guest: no network, so only the NoCloud seed disk can hold the data.
datasource_list: [NoCloud, None]
"""


class ImageError(Exception):
    """An image could not be built; the message names the step and its output."""


def cache_root() -> Path:
    return Path(os.environ.get("GUESTAGENT_IMAGE_CACHE", "/var/cache/guestagent-testbed"))


def missing_tools() -> list[str]:
    """Tools the builder needs, each with the Debian package that ships it."""
    return [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items()
            if shutil.which(tool) is None]


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. 6.1.0-28-amd64 or 6.1.0-28-rt-amd64
    vmlinuz: Path
    initrd: Path

    @property
    def preempt_rt(self) -> bool:
        return "-rt-" in self.version


@dataclass(frozen=True)
class GuestImage:
    """A built image: the root disk and the kernels whose modules it holds."""

    root: Path  # ext4, boot it as a throwaway overlay (never write to it)
    kernels: tuple[Kernel, ...]
    key: str

    def kernel(self, rt: bool) -> Kernel:
        for k in self.kernels:
            if k.preempt_rt == rt:
                return k
        raise ImageError(f"image {self.key} has no {'PREEMPT_RT' if rt else 'stock'} kernel")


def _run(cmd: Sequence[str], step: str, timeout: float = 1800, **kw) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise ImageError(f"{step}: {cmd[0]} exited {proc.returncode}:\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def recipe(mirror: str | None = None) -> dict:
    """Everything that decides the image's content; its hash is the cache key."""
    return {"version": RECIPE_VERSION, "suite": SUITE, "packages": list(PACKAGES),
            "mirror": mirror or os.environ.get("GUESTAGENT_IMAGE_MIRROR", ""),
            "size": ROOT_SIZE, "ctl_unit": CTL_UNIT, "fstab": FSTAB, "cloud_cfg": CLOUD_CFG,
            "guest_ctl": hashlib.sha256(GUEST_CTL.read_bytes()).hexdigest()}


def recipe_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per cache entry: parallel test runs wait instead of racing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _hooks() -> list[str]:
    """mmdebstrap customize hooks ("$1" is the new root), run after every package is in."""
    lib = "/usr/local/lib/guestagent-testbed"
    return [
        f'mkdir -p "$1{lib}" "$1{REPO_MOUNT}"',
        f'copy-in {GUEST_CTL} {lib}',
        f'printf %s {_sh(CTL_UNIT)} > "$1/etc/systemd/system/{CTL_SERVICE}"',
        f'ln -sf /etc/systemd/system/{CTL_SERVICE} '
        f'"$1/etc/systemd/system/multi-user.target.wants/{CTL_SERVICE}"',
        f'printf %s {_sh(FSTAB)} > "$1/etc/fstab"',
        f'printf %s {_sh(CLOUD_CFG)} > "$1/etc/cloud/cloud.cfg.d/90-guestagent-testbed.cfg"',
        'echo guestagent-test > "$1/etc/hostname"',
        # No network in the guest: apt knows only the local repository cloud-init adds.
        'rm -f "$1/etc/apt/sources.list" "$1"/etc/apt/sources.list.d/*',
        'chroot "$1" passwd -d root',  # a console login for debugging by hand
        # Timers that would start apt or fstrim in the middle of a test.
        'for t in apt-daily apt-daily-upgrade fstrim e2scrub_all; do '
        'ln -sf /dev/null "$1/etc/systemd/system/$t.timer"; done',
    ]


def _sh(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _mke2fs(tree: Path, out: Path, size: str, label: str | None = None) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree)]
    if label:
        cmd += ["-L", label]
    _run(cmd + [str(tmp), size], "mke2fs")
    os.replace(tmp, out)


def _collect_kernels(tree: Path, dest: Path) -> tuple[Kernel, ...]:
    found = []
    for vmlinuz in sorted((tree / "boot").glob("vmlinuz-*")):
        version = vmlinuz.name[len("vmlinuz-"):]
        initrd = tree / "boot" / f"initrd.img-{version}"
        if not initrd.exists():
            raise ImageError(f"kernel {version} has no initrd in the image")
        k = Kernel(version, dest / vmlinuz.name, dest / initrd.name)
        shutil.copyfile(vmlinuz, k.vmlinuz)
        shutil.copyfile(initrd, k.initrd)
        found.append(k)
    return tuple(found)


def _load(entry: Path, key: str) -> GuestImage | None:
    manifest = entry / "manifest.json"
    if not manifest.exists():
        return None
    doc = json.loads(manifest.read_text())
    kernels = tuple(Kernel(v, entry / f"vmlinuz-{v}", entry / f"initrd.img-{v}")
                    for v in doc["kernels"])
    return GuestImage(entry / "root.ext4", kernels, key)


def build_image(mirror: str | None = None, log: list[str] | None = None) -> GuestImage:
    """The cached image for the current recipe, built first if it is not there."""
    spec = recipe(mirror)
    key = recipe_key(spec)
    entry = cache_root() / f"base-{key}"
    with _locked(cache_root() / f"base-{key}.lock"):
        found = _load(entry, key)
        if found:
            return found
        missing = missing_tools()
        if missing:
            raise ImageError("cannot build the guest image: missing " + "; ".join(missing))
        shutil.rmtree(entry, ignore_errors=True)
        entry.mkdir(parents=True)
        started = time.monotonic()
        tree = entry / "tree"  # kept: the preinstalled variant starts from a copy
        cmd = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
               "--components=main", *(f"--customize-hook={h}" for h in _hooks()),
               SUITE, str(tree)]
        if spec["mirror"]:
            cmd.append(spec["mirror"])
        _run(cmd, "mmdebstrap")
        kernels = _collect_kernels(tree, entry)
        if sorted(k.preempt_rt for k in kernels) != [False, True]:
            raise ImageError(f"expected a stock and a PREEMPT_RT kernel, got "
                             f"{[k.version for k in kernels]}")
        _mke2fs(tree, entry / "root.ext4", ROOT_SIZE)
        (entry / "manifest.json").write_text(json.dumps(
            {"recipe": spec, "kernels": [k.version for k in kernels],
             "build_seconds": round(time.monotonic() - started, 1)}, indent=1))
        if log is not None:
            log.append(f"built image {key} in {time.monotonic() - started:.0f} s")
        return GuestImage(entry / "root.ext4", kernels, key)


def preinstalled_image(base: GuestImage, debs: Sequence[Path]) -> GuestImage:
    """The base image with .debs installed by dpkg at build time (vendor-data's case)."""
    h = hashlib.sha256(base.key.encode())
    for deb in debs:
        h.update(_sha256(deb).encode())
    key = f"{base.key}-{h.hexdigest()[:12]}"
    entry = cache_root() / f"pre-{key}"
    with _locked(cache_root() / f"pre-{key}.lock"):
        root = entry / "root.ext4"
        if root.exists():
            return GuestImage(root, base.kernels, key)
        entry.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=entry) as tmp:
            tree = Path(tmp) / "tree"
            _run(["cp", "-a", str(base.root.parent / "tree"), str(tree)], "copy the base tree")
            for deb in debs:
                shutil.copyfile(deb, tree / "tmp" / deb.name)
            _run(["chroot", str(tree), "dpkg", "-i", *(f"/tmp/{d.name}" for d in debs)],
                 "dpkg -i in the image", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                              "LANG": "C.UTF-8"})
            for deb in debs:
                (tree / "tmp" / deb.name).unlink()
            _mke2fs(tree, root, ROOT_SIZE)
        return GuestImage(root, base.kernels, key)


# --- the disks attached beside the root ------------------------------------------------


def repo_disk(suites: dict[str, Sequence[Path]], out: Path) -> Path:
    """An ext4 disk labelled ``garepo``: one flat apt repository per directory name.

    The user-data's source names ``current``; a test that upgrades adds another
    directory (``next``) as a second source, the way an admin would.
    """
    with tempfile.TemporaryDirectory() as tmp:
        for name, debs in suites.items():
            tree = Path(tmp) / name
            tree.mkdir()
            for deb in debs:
                shutil.copyfile(deb, tree / deb.name)
            index = subprocess.run(["dpkg-scanpackages", "."], cwd=tree,
                                   capture_output=True, text=True, timeout=120)
            if index.returncode != 0:
                raise ImageError(f"dpkg-scanpackages: {index.stderr[-2000:]}")
            (tree / "Packages").write_text(index.stdout)
        _mke2fs(Path(tmp), out, "64M", label=REPO_LABEL)
    return out


def repo_source(name: str) -> str:
    return f"deb [trusted=yes] file:{REPO_MOUNT}/{name} ./"


def with_package_source(user_data: str) -> str:
    """The user-data with the local repository as its only package source added.

    The image has no other apt source; ``preserve_sources_list`` keeps cloud-init
    from writing Debian's default mirrors, which the offline guest cannot reach.
    """
    import yaml

    header, _, _ = user_data.partition("\n")
    if header.strip() != "#cloud-config":
        raise ImageError("user-data does not start with #cloud-config")
    doc = yaml.safe_load(user_data)
    if "apt" in doc:
        raise ImageError("user-data already configures apt; refusing to merge")
    doc["apt"] = {"preserve_sources_list": True,
                  "sources": {"guestagent-local": {"source": repo_source("current")}}}
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)


def seed_disk(user_data: str, out: Path, instance_id: str,
              vendor_data: str | None = None) -> Path:
    """A NoCloud seed: an ISO 9660 volume labelled CIDATA."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        (tree / "user-data").write_text(user_data)
        (tree / "meta-data").write_text(f"instance-id: {instance_id}\n"
                                        "local-hostname: guestagent-test\n")
        files = ["user-data", "meta-data"]
        if vendor_data is not None:
            (tree / "vendor-data").write_text(vendor_data)
            files.append("vendor-data")
        _run(["genisoimage", "-quiet", "-output", str(out), "-volid", "cidata",
              "-joliet", "-rock", *files], "genisoimage", cwd=tree)
    return out
