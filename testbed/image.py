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
the NoCloud seed disk, and a variant of the image with the .debs preinstalled
(built per run beside the test's files, never cached: the .debs change with
every commit, the cached image does not).
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

# Bump when the build steps change in a way the recipes below do not show.
RECIPE_VERSION = 2
SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv", "udev", "python3", "python3-pyudev", "cloud-init", "rt-tests",
    "linux-image-amd64", "linux-image-rt-amd64", "procps",
)
ROOT_SIZE = "3G"  # sparse; leaves room for apt to install and upgrade in the guest
REPO_MOUNT = "/srv/guestagent-repo"
REPO_LABEL = "garepo"
CTL_SERVICE = "guestagent-testbed-ctl.service"
CTL_DIR = "usr/local/lib/guestagent-testbed"
TOOLS = {"mmdebstrap": "mmdebstrap", "mke2fs": "e2fsprogs",
         "dpkg-scanpackages": "dpkg-dev", "genisoimage": "genisoimage"}
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

CTL_UNIT = f"""\
[Unit]
Description=guestagent test harness: command server on {CTL_PORT}
After=systemd-udevd.service

[Service]
ExecStart=/usr/bin/python3 /{CTL_DIR}/guest_ctl.py {CTL_PORT}
Restart=always
RestartSec=1s

[Install]
WantedBy=multi-user.target
"""
# Optional (nofail), but cloud-init's apt stage waits for it; udev can take minutes
# to see the disk's label in a TCG guest on a busy machine.
REPO_MOUNT_OPTIONS = "ro,nofail,x-systemd.device-timeout=180s,x-systemd.before=cloud-config.service"
FSTAB = f"""\
/dev/vda / ext4 rw,errors=remount-ro 0 1
LABEL={REPO_LABEL} {REPO_MOUNT} ext4 {REPO_MOUNT_OPTIONS} 0 2
"""
CLOUD_CFG = """\
# Test guest: no network, so only the NoCloud seed disk can hold the data.
datasource_list: [NoCloud, None]
# minbase generates no locale; C.UTF-8 is built into libc.
locale: C.UTF-8
# No sshd in the image: no host keys to generate. Keys given (none) are not generated;
# an empty ssh_genkeytypes would say the same but fails cloud-init's schema (minItems 1).
ssh_keys: {}
"""
# Files written into the tree (path -> text), and symlinks (path -> target).
FILES = {
    f"etc/systemd/system/{CTL_SERVICE}": CTL_UNIT,
    "etc/fstab": FSTAB,
    "etc/cloud/cloud.cfg.d/90-guestagent-testbed.cfg": CLOUD_CFG,
    "etc/hostname": "guestagent-test\n",
}
LINKS = {
    f"etc/systemd/system/multi-user.target.wants/{CTL_SERVICE}":
        f"/etc/systemd/system/{CTL_SERVICE}",
    # Timers that would start apt or fstrim in the middle of a test.
    **{f"etc/systemd/system/{t}.timer": "/dev/null"
       for t in ("apt-daily", "apt-daily-upgrade", "fstrim", "e2scrub_all")},
}


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

    root: Path  # ext4; boot it through a throwaway overlay, never write to it
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


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _locked(name: str) -> Iterator[Path]:
    """The cache entry ``name``, held by one builder: parallel runs wait, not race."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield root / name


def _mke2fs(tree: Path, out: Path, size: str, label: str | None = None) -> None:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree)]
    if label:
        cmd += ["-L", label]
    _run(cmd + [str(tmp), size], "mke2fs")
    os.replace(tmp, out)


@dataclass(frozen=True)
class _Tree:
    """Stage 1: the packages installed by mmdebstrap, and the kernels copied out."""

    path: Path
    kernels: tuple[Kernel, ...]
    key: str


def _debian_tree(mirror: str) -> _Tree:
    """The slow stage (minutes, network), cached on the package list alone."""
    key = _key(RECIPE_VERSION, SUITE, PACKAGES, mirror)
    with _locked(f"tree-{key}") as entry:
        manifest = entry / "manifest.json"
        if manifest.exists():
            versions = json.loads(manifest.read_text())["kernels"]
            return _Tree(entry / "tree", tuple(
                Kernel(v, entry / f"vmlinuz-{v}", entry / f"initrd.img-{v}") for v in versions),
                key)
        missing = missing_tools()
        if missing:
            raise ImageError("cannot build the guest image: missing " + "; ".join(missing))
        shutil.rmtree(entry, ignore_errors=True)
        entry.mkdir(parents=True)
        started = time.monotonic()
        cmd = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
               "--components=main", SUITE, str(entry / "tree")]
        _run(cmd + ([mirror] if mirror else []), "mmdebstrap")
        kernels = []
        for vmlinuz in sorted((entry / "tree" / "boot").glob("vmlinuz-*")):
            version = vmlinuz.name[len("vmlinuz-"):]
            initrd = vmlinuz.with_name(f"initrd.img-{version}")
            if not initrd.exists():
                raise ImageError(f"kernel {version} has no initrd in the image")
            k = Kernel(version, entry / vmlinuz.name, entry / initrd.name)
            shutil.copyfile(vmlinuz, k.vmlinuz)
            shutil.copyfile(initrd, k.initrd)
            kernels.append(k)
        if sorted(k.preempt_rt for k in kernels) != [False, True]:
            raise ImageError(f"expected a stock and a PREEMPT_RT kernel, got "
                             f"{[k.version for k in kernels]}")
        manifest.write_text(json.dumps({"kernels": [k.version for k in kernels],
                                        "seconds": round(time.monotonic() - started, 1)}))
        return _Tree(entry / "tree", tuple(kernels), key)


def _customize(tree: Path, debs: Sequence[Path]) -> None:
    """Stage 2, on a copy of the tree: the test fixtures, then any preinstalled .debs."""
    (tree / CTL_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GUEST_CTL, tree / CTL_DIR / "guest_ctl.py")
    (tree / REPO_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for path, text in FILES.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    for path, target in LINKS.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        if (tree / path).is_symlink() or (tree / path).exists():
            (tree / path).unlink()
        os.symlink(target, tree / path)
    # No network in the guest: apt knows only the local repository cloud-init adds.
    for sources in [tree / "etc/apt/sources.list", *(tree / "etc/apt/sources.list.d").glob("*")]:
        if sources.exists():
            sources.unlink()
    _run(["chroot", str(tree), "passwd", "-d", "root"], "passwd", env=CHROOT_ENV)  # console login
    for deb in debs:
        shutil.copyfile(deb, tree / "tmp" / deb.name)
    if debs:
        _run(["chroot", str(tree), "dpkg", "-i", *(f"/tmp/{d.name}" for d in debs)],
             "dpkg -i in the image", env=CHROOT_ENV)
    for deb in debs:
        (tree / "tmp" / deb.name).unlink()


def build_image(mirror: str | None = None) -> GuestImage:
    """The cached image, built first if it is not there.

    Two stages, cached apart: the Debian tree (mmdebstrap, minutes) keyed on the
    package list, and the root disk (a copy of the tree with the test fixtures,
    then mke2fs; seconds) keyed on that and on the fixtures. Nothing built from
    this working tree goes in, so every commit on this machine reuses it.
    """
    tree = _tree(mirror)
    key = _key(tree.key, FILES, LINKS, _sha256(GUEST_CTL), ROOT_SIZE)
    with _locked(f"image-{key}") as entry:
        root = entry / "root.ext4"
        if not root.exists():
            entry.mkdir(parents=True, exist_ok=True)
            _root_disk(tree, root, ())
        return GuestImage(root, tree.kernels, key)


def preinstalled_image(debs: Sequence[Path], out: Path, mirror: str | None = None) -> GuestImage:
    """The image with ``debs`` installed by dpkg, written to ``out`` (not cached:
    the .debs change with every commit). Costs a copy of the cached tree and mke2fs."""
    tree = _tree(mirror)
    _root_disk(tree, out, debs)
    return GuestImage(out, tree.kernels, _key(tree.key, [_sha256(d) for d in debs]))


def _tree(mirror: str | None) -> _Tree:
    return _debian_tree(mirror if mirror is not None
                        else os.environ.get("GUESTAGENT_IMAGE_MIRROR", ""))


def _root_disk(tree: _Tree, out: Path, debs: Sequence[Path]) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        copy = Path(tmp) / "tree"
        _run(["cp", "-a", str(tree.path), str(copy)], "copy the Debian tree")
        _customize(copy, debs)
        _mke2fs(copy, out, ROOT_SIZE)


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
    """The user-data text unchanged, with the local repository appended as apt source.

    The image has no other apt source; ``preserve_sources_list`` keeps cloud-init
    from writing Debian's default mirrors, which the offline guest cannot reach.
    """
    import yaml

    doc = yaml.safe_load(user_data)
    if not user_data.startswith("#cloud-config\n") or not isinstance(doc, dict):
        raise ImageError("user-data is not a #cloud-config mapping")
    if "apt" in doc:
        raise ImageError("user-data already configures apt; refusing to merge")
    added = ("# Added for the offline test guest: the local repository disk.\n"
             "apt:\n  preserve_sources_list: true\n  sources:\n    guestagent-local:\n"
             f"      source: \"{repo_source('current')}\"\n")
    text = user_data.rstrip("\n") + "\n" + added
    if yaml.safe_load(text) != dict(doc, apt=yaml.safe_load(added)["apt"]):
        raise ImageError("appending the apt source changed the rest of the user-data")
    return text


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
