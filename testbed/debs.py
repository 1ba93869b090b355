"""Build the project's .debs from the working tree, with a chosen Debian revision.

Guest-image tests install what a user would: the packages dpkg-buildpackage
makes from packaging/debian. A second build with a higher revision stands in
for an upgrade. The build runs in a copy of the tree, so the tree stays clean.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from testbed.vm import REPO_ROOT

CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


class BuildError(Exception):
    """dpkg-buildpackage failed; the message ends with its output."""


def copy_tree(dest: Path) -> Path:
    """The project's files as a clean clone has them, plus uncommitted work."""
    listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = REPO_ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _bump_changelog(changelog: Path, revision: int) -> str:
    """Prepend an entry whose version is the current upstream version -<revision>."""
    text = changelog.read_text()
    head = text.splitlines()[0]  # "guestagent (0.1.0-1) unstable; urgency=medium"
    source, rest = head.split(" (", 1)
    version, tail = rest.split(")", 1)
    upstream = version.rsplit("-", 1)[0]
    new = f"{upstream}-{revision}"
    trailer = next(ln for ln in text.splitlines() if ln.startswith(" -- "))
    entry = (f"{source} ({new}){tail}\n\n  * Rebuild for an upgrade test.\n\n{trailer}\n\n")
    changelog.write_text(entry + text)
    return new


def build_debs(work: Path, revision: int | None = None) -> list[Path]:
    """Every .deb the source package builds; ``revision`` replaces the Debian revision."""
    src = copy_tree(work / "src")
    shutil.copytree(src / "packaging" / "debian", src / "debian")
    if revision is not None:
        _bump_changelog(src / "debian" / "changelog", revision)
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=CLEAN_ENV,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise BuildError(f"dpkg-buildpackage exited {proc.returncode}:\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    debs = sorted(work.glob("*.deb"))
    if not debs:
        raise BuildError("dpkg-buildpackage made no .deb")
    return debs
