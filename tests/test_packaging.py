"""The deb and rpm, built with the real tools, installed and run.

One build of each package per test session (module-scoped fixtures), from a
copy of the working tree, so the tree itself is never dirtied. The .deb is
installed with a real `dpkg -i` into a throwaway root: an overlay of this
machine's own root in a private mount namespace, entered with chroot. That
installs against the real Debian python3 and python3-pyudev
and runs the maintainer scripts, without touching this machine's dpkg
database (a debootstrap chroot would download a whole system for each run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from guestagent import __version__

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "guestagent.service"
RULE = PACKAGING / "udev" / "60-guestagent.rules"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
TOOLS = ("dpkg-buildpackage", "lintian", "rpmbuild", "rpm2cpio", "cpio", "rpmlint",
         "systemd-analyze", "udevadm", "unshare", "chroot")

missing = [t for t in TOOLS if shutil.which(t, path=CLEAN_ENV["PATH"]) is None]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"missing tools (.ci/run installs them): {missing}"),
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: mount namespaces and overlayfs for the install root"),
]


def run(cmd: list[str], cwd: Path | None = None, timeout: int = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def copy_tree(dest: Path) -> Path:
    """The project's files as a clean clone has them, plus uncommitted work."""
    listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("deb")
    src = copy_tree(work / "guestagent")
    shutil.copytree(src / "packaging" / "debian", src / "debian")
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
    return work / f"guestagent_{__version__}-1_all.deb"


@pytest.fixture(scope="module")
def rpm(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("rpm")
    top = f"guestagent-{__version__}"
    copy_tree(work / top)
    (work / "SOURCES").mkdir()
    with tarfile.open(work / "SOURCES" / f"{top}.tar.gz", "w:gz") as tar:
        tar.add(work / top, arcname=top)
    # --nodeps: BuildRequires name Fedora packages, which a Debian host's rpm
    # database does not hold; the Debian equivalents are installed by .ci/run.
    run(["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {work}",
         str(PACKAGING / "rpm" / "guestagent.spec")])
    return work / "RPMS" / "noarch" / f"{top}-1.noarch.rpm"


class InstallRoot:
    """This machine's root under an overlay, with the .deb installed by dpkg."""

    SETUP = """set -e
M="$1"; shift
mount -t overlay overlay -o lowerdir=/,upperdir="$UPPER",workdir="$WORK" "$M"
mount --bind /proc "$M/proc"
mount --rbind /dev "$M/dev"
mount --bind /sys "$M/sys"
mount -t tmpfs tmpfs "$M/run"
exec chroot "$M" "$@"
"""

    def __init__(self, base: Path):
        self.upper, self.work, self.mnt = base / "upper", base / "work", base / "root"
        for d in (self.upper, self.work, self.mnt):
            d.mkdir()

    def add(self, path: str, data: bytes) -> None:
        """Put a file into the root (into the overlay's upper layer)."""
        target = self.upper / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(CLEAN_ENV, UPPER=str(self.upper), WORK=str(self.work))
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", self.SETUP,
             "setup", str(self.mnt), "env", "-i", *(f"{k}={v}" for k, v in CLEAN_ENV.items()),
             *cmd], env=env, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            pytest.fail(f"in install root: {' '.join(cmd)} exited {proc.returncode}:\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc


@pytest.fixture(scope="module")
def installed(deb, tmp_path_factory) -> InstallRoot:
    root = InstallRoot(tmp_path_factory.mktemp("installroot"))
    root.add("/root/guestagent.deb", deb.read_bytes())
    root.run("dpkg", "-i", "/root/guestagent.deb")
    return root


# --- the .deb ---------------------------------------------------------------

def test_deb_is_lintian_clean(deb):
    changes = deb.parent / f"guestagent_{__version__}-1_{deb_arch()}.changes"
    proc = run(["lintian", "--pedantic", "--fail-on", "error,warning", str(changes)],
               check=False)
    findings = [ln for ln in proc.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert proc.returncode == 0 and not findings, proc.stdout + proc.stderr


def deb_arch() -> str:
    return run(["dpkg", "--print-architecture"]).stdout.strip()


def test_deb_ships_every_piece(deb):
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in ("./usr/bin/guestagent", "./usr/bin/guestagent-host",
                 "./usr/lib/python3/dist-packages/guestagent/cli/__init__.py",
                 "./lib/systemd/system/guestagent.service",
                 "./lib/udev/rules.d/60-guestagent.rules",
                 "./usr/lib/sysusers.d/guestagent.conf",
                 "./etc/guestagent/guestagent.toml", "./etc/default/guestagent",
                 "./usr/share/man/man8/guestagent.8.gz",
                 "./usr/share/man/man8/guestagent-host.8.gz",
                 "./usr/share/man/man5/guestagent.toml.5.gz"):
        assert f" {path}\n" in listing + "\n", path
    conffiles = run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout.split()
    assert set(conffiles) == {"/etc/guestagent/guestagent.toml", "/etc/default/guestagent"}
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    assert "python3-pyudev" in depends


def test_installed_deb_runs_with_debian_python(installed):
    version = installed.run("guestagent", "--version")
    assert version.stdout.strip() == f"guestagent {__version__}"
    where = installed.run("python3", "-c", "import guestagent, pyudev; "
                          "print(guestagent.__file__); print(pyudev.__file__)")
    assert where.stdout.split() == [
        "/usr/lib/python3/dist-packages/guestagent/__init__.py",
        "/usr/lib/python3/dist-packages/pyudev/__init__.py"]
    tasks = installed.run("guestagent", "tasks", "--json")
    doc = json.loads(tasks.stdout)
    assert doc["tasks"], "the installed agent saw no tasks"
    assert installed.run("guestagent-host", "--help").stdout.startswith("usage: guestagent-host")


def test_installed_agent_has_the_units_execstart(installed):
    """ExecStart is `guestagent run $GUESTAGENT_ARGS`: the installed CLI must know `run`."""
    proc = installed.run("guestagent", "run", "--help", check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: guestagent run"), proc.stderr


def test_installed_conffile_is_the_schema_default(installed):
    from guestagent.agent.config import render_default_toml

    shipped = installed.run("cat", "/etc/guestagent/guestagent.toml").stdout
    assert shipped == render_default_toml()
    assert all(not ln or ln.startswith("#") or ln.startswith("[")
               for ln in shipped.splitlines()), "a key is set instead of commented"
    env = installed.run("cat", "/etc/default/guestagent").stdout
    assert re.search(r'^GUESTAGENT_ARGS=""$', env, re.M)


def test_install_creates_group_and_man_pages(installed):
    assert installed.run("getent", "group", "guestagent").stdout.startswith("guestagent:")
    pages = installed.run("man", "-w", "guestagent", "guestagent-host", "guestagent.toml")
    assert len(pages.stdout.split()) == 3


def test_installed_unit_passes_systemd_analyze_verify(installed):
    # Needs the installed ExecStart binary and man pages, hence in the root.
    proc = installed.run("systemd-analyze", "verify", "/lib/systemd/system/guestagent.service",
                         check=False)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stderr


def test_installed_udev_rule_parses(installed):
    """udevadm test loads every rules file and names each line it cannot parse."""
    # A match written as an assignment, which udev refuses (missing commas it
    # accepts silently: test_udev_rule_tokens checks those).
    broken = RULE.read_text().replace('SUBSYSTEM=="', 'SUBSYSTEM="')
    installed.add("/etc/udev/rules.d/61-broken-copy.rules", broken.encode())
    proc = installed.run("udevadm", "test", "--action=add", "/sys/class/net/lo", check=False)
    out = proc.stdout + proc.stderr
    assert "Reading rules file: /usr/lib/udev/rules.d/60-guestagent.rules" in out
    assert not [ln for ln in out.splitlines() if "60-guestagent.rules:" in ln], out
    # The verifier does catch errors: the broken copy is reported.
    assert "61-broken-copy.rules:" in out


# --- the .rpm ---------------------------------------------------------------

def rpm_payload(rpm: Path, dest: Path) -> list[str]:
    cpio = subprocess.run(f"rpm2cpio '{rpm}' | cpio -idm --quiet -D '{dest}' -v",
                          shell=True, env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=60)
    assert cpio.returncode == 0, cpio.stderr
    return [ln.lstrip(".") for ln in cpio.stderr.split()]


def test_rpm_payload_runs_with_debian_python(rpm, tmp_path):
    files = rpm_payload(rpm, tmp_path)
    for path in ("/usr/bin/guestagent", "/usr/bin/guestagent-host",
                 "/usr/lib/systemd/system/guestagent.service",
                 "/usr/lib/udev/rules.d/60-guestagent.rules",
                 "/usr/lib/sysusers.d/guestagent.conf",
                 "/etc/guestagent/guestagent.toml", "/etc/sysconfig/guestagent",
                 "/usr/share/man/man8/guestagent.8.gz",
                 "/usr/share/man/man8/guestagent-host.8.gz",
                 "/usr/share/man/man5/guestagent.toml.5.gz"):
        assert path in files, path
    sitelib = next(tmp_path.glob("usr/lib/python3*/site-packages"))
    env = dict(CLEAN_ENV, PYTHONPATH=str(sitelib))
    script = tmp_path / "usr" / "bin" / "guestagent"
    assert script.read_text().startswith("#!/usr/bin/python3\n")
    proc = subprocess.run(["/usr/bin/python3", str(script), "--version"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == f"guestagent {__version__}", proc.stderr
    unit = (tmp_path / "usr/lib/systemd/system/guestagent.service").read_text()
    assert "EnvironmentFile=-/etc/sysconfig/guestagent\n" in unit
    assert "EnvironmentFile=-/etc/default/" not in unit


def test_rpm_metadata(rpm):
    config = run(["rpm", "-qp", "--configfiles", str(rpm)]).stdout.split()
    assert set(config) == {"/etc/guestagent/guestagent.toml", "/etc/sysconfig/guestagent"}
    requires = run(["rpm", "-qp", "--requires", str(rpm)]).stdout
    assert "python3-pyudev" in requires
    scripts = run(["rpm", "-qp", "--scripts", str(rpm)]).stdout
    assert "groupadd -r guestagent" in scripts


def test_rpmlint_is_clean(rpm):
    proc = run(["rpmlint", "-c", str(PACKAGING / "rpm" / "rpmlint.toml"), str(rpm),
                str(PACKAGING / "rpm" / "guestagent.spec")], check=False)
    assert proc.returncode == 0, proc.stdout
    assert "0 errors, 0 warnings" in proc.stdout, proc.stdout


# --- the unit and the rule, as files -----------------------------------------

def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_is_notify_watchdog_and_hardened():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["Restart"] == ["on-failure"]
    assert s["ExecStart"] == ["/usr/bin/guestagent run $GUESTAGENT_ARGS"]
    assert s["EnvironmentFile"] == ["-/etc/default/guestagent"]
    assert s["WatchdogSec"] and s["RuntimeDirectory"] == ["guestagent"]
    assert set(s["CapabilityBoundingSet"][0].split()) == {
        "CAP_NET_ADMIN", "CAP_SYS_NICE", "CAP_SYS_ADMIN", "CAP_PERFMON"}
    assert "perf_event_open" in s["SystemCallFilter"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]


def test_unit_security_exposure_matches_readme():
    proc = run(["systemd-analyze", "security", "--offline=true", str(UNIT)], check=False)
    found = re.search(r"Overall exposure level for guestagent\.service: (\d+\.\d)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    exposure = float(found.group(1))
    assert exposure <= 3.0
    readme = (ROOT / "README.md").read_text()
    assert f"exposure level {found.group(1)}" in readme, "update the figure in README.md"


RULE_TOKEN = re.compile(r'(?P<key>[A-Z_]+)(\{(?P<attr>[^}]+)\})?(?P<op>==|!=|\+=|-=|:=|=)'
                        r'"(?P<value>[^"]*)"')


def test_udev_rule_tokens():
    rules = [ln for ln in RULE.read_text().splitlines() if ln and not ln.startswith("#")]
    parsed = []
    for line in rules:
        tokens = line.split(", ")
        matches = [RULE_TOKEN.fullmatch(t) for t in tokens]
        assert all(matches), f"token not KEY{{attr}}OP\"value\" or not comma-separated: {line}"
        parsed.append({(m["key"], m["attr"], m["op"]): m["value"] for m in matches})
    port, pci = parsed
    assert port[("SUBSYSTEM", None, "==")] == "virtio-ports"
    assert port[("ATTR", "name", "==")] == "org.guestagent.hints.0"
    assert pci[("SUBSYSTEM", None, "==")] == "pci"
    assert (pci[("ATTR", "vendor", "==")], pci[("ATTR", "device", "==")]) == ("0x1af4", "0x1110")
    for rule in parsed:
        assert rule[("TAG", None, "+=")] == "systemd"
        assert rule[("ENV", "SYSTEMD_WANTS", "+=")] == "guestagent.service"
