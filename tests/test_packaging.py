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
import sys
from pathlib import Path

import pytest

from guestagent import __version__
from testbed.debs import copy_tree

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "guestagent.service"
RULE = PACKAGING / "udev" / "60-guestagent.rules"
PACKAGES = ("guestagent", "guestagent-host", "python3-guestagent")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
TOOLS = ("git", "dpkg-buildpackage", "lintian", "rpmbuild", "rpm2cpio", "cpio", "rpmlint",
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


def readme_recipe(tool: str) -> str:
    """The build commands README.md gives for tool, joined into one shell command."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"\n\n((?:    .*\n)+)", text[text.index("## Install"):]).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return next(ln.strip() for ln in lines if tool in ln)


def foreign_python_path() -> str:
    """PATH with a python3 that is not Debian's first, as on machines with pyenv or a
    virtualenv (the test suite's own interpreter, when it is not /usr/bin/python3)."""
    here = os.path.dirname(sys.executable)
    extra = [d for d in (here, "/root/.pyenv/shims") if d not in ("/usr/bin", "/bin")
             and os.path.exists(os.path.join(d, "python3"))]
    return ":".join(extra[:1] + [CLEAN_ENV["PATH"]])


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> dict[str, Path]:
    """The three .debs, built with README's command while another python3 comes first."""
    work = tmp_path_factory.mktemp("deb")
    src = copy_tree(work / "guestagent")
    proc = subprocess.run(["sh", "-c", readme_recipe("dpkg-buildpackage")], cwd=src,
                          env=dict(CLEAN_ENV, PATH=foreign_python_path()),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {p: work / f"{p}_{__version__}-1_all.deb" for p in PACKAGES}


@pytest.fixture(scope="module")
def deb(debs) -> Path:
    return debs["guestagent"]


@pytest.fixture(scope="module")
def rpms(tmp_path_factory) -> dict[str, Path]:
    """The three .rpms, built with README's commands in a fresh git checkout by a user
    whose home has no ~/rpmbuild."""
    work = tmp_path_factory.mktemp("rpm")
    src = copy_tree(work / "src")
    home = work / "home"
    home.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "tree"]):
        run(git + cmd, cwd=src)
    # --nodeps: BuildRequires name Fedora packages, which a Debian host's rpm
    # database does not hold; the Debian equivalents are installed by .ci/run.
    recipe = readme_recipe("git archive").replace("rpmbuild -bb", "rpmbuild -bb --nodeps")
    proc = subprocess.run(["sh", "-c", recipe], cwd=src, env=dict(CLEAN_ENV, HOME=str(home)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {p: src / "noarch" / f"{p}-{__version__}-1.noarch.rpm" for p in PACKAGES}


@pytest.fixture(scope="module")
def rpm(rpms) -> Path:
    return rpms["guestagent"]


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
             *cmd], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=120)
        if check and proc.returncode != 0:
            pytest.fail(f"in install root: {' '.join(cmd)} exited {proc.returncode}:\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc


def install_root(base: Path, debs: dict[str, Path], *names: str) -> InstallRoot:
    root = InstallRoot(base)
    for name in names:
        root.add(f"/root/{name}.deb", debs[name].read_bytes())
    root.run("dpkg", "-i", *(f"/root/{name}.deb" for name in names))
    return root


@pytest.fixture(scope="module")
def installed(debs, tmp_path_factory) -> InstallRoot:
    """A guest: guestagent and the shared modules."""
    return install_root(tmp_path_factory.mktemp("guestroot"), debs, "python3-guestagent",
                        "guestagent")


@pytest.fixture(scope="module")
def host_installed(debs, tmp_path_factory) -> InstallRoot:
    """A host: guestagent-host and the shared modules, no guest package."""
    return install_root(tmp_path_factory.mktemp("hostroot"), debs, "python3-guestagent",
                        "guestagent-host")


# --- the .deb ---------------------------------------------------------------

def test_deb_is_lintian_clean(deb):
    changes = deb.parent / f"guestagent_{__version__}-1_{deb_arch()}.changes"
    proc = run(["lintian", "--pedantic", "--fail-on", "error,warning", str(changes)],
               check=False)
    findings = [ln for ln in proc.stdout.splitlines() if ln[:2] in ("E:", "W:")]
    assert proc.returncode == 0 and not findings, proc.stdout + proc.stderr


def deb_arch() -> str:
    return run(["dpkg", "--print-architecture"]).stdout.strip()


SITE = "./usr/lib/python3/dist-packages/guestagent"
# What each package must ship, and (by directory) what it must not.
DEB_FILES = {
    "guestagent": ("./usr/bin/guestagent", f"{SITE}/cli/__init__.py", f"{SITE}/agent/daemon.py",
                   "./lib/systemd/system/guestagent.service",
                   "./lib/udev/rules.d/60-guestagent.rules",
                   "./usr/lib/sysusers.d/guestagent.conf",
                   "./etc/guestagent/guestagent.toml", "./etc/default/guestagent",
                   "./usr/share/man/man8/guestagent.8.gz",
                   "./usr/share/man/man5/guestagent.toml.5.gz",
                   "./usr/share/bash-completion/completions/guestagent",
                   "./usr/share/doc/guestagent/protocol.md.gz",
                   "./usr/share/doc/guestagent/cli-json.md.gz",
                   "./usr/share/doc/guestagent/policy.md.gz"),
    "guestagent-host": ("./usr/bin/guestagent-host", f"{SITE}/host/cli.py",
                        "./lib/systemd/system/guestagent-host.service",
                        "./etc/guestagent-host/guestagent-host.toml",
                        "./etc/default/guestagent-host",
                        "./usr/share/man/man8/guestagent-host.8.gz",
                        "./usr/share/bash-completion/completions/guestagent-host",
                        "./usr/share/doc/guestagent-host/host.md.gz",
                        "./usr/share/doc/guestagent-host/protocol.md.gz",
                        "./usr/share/doc/guestagent-host/cli-json.md.gz"),
    "python3-guestagent": (f"{SITE}/__init__.py", f"{SITE}/protocol/region.py",
                           f"{SITE}/transport/region_link.py", f"{SITE}/cmdline.py",
                           f"{SITE}/display.py", f"{SITE}/observe/parse.py"),
}
NOT_IN = {"guestagent": (f"{SITE}/host/", "guestagent-host", f"{SITE}/protocol/"),
          "guestagent-host": (f"{SITE}/agent/", f"{SITE}/cli/", "udev", "sysusers",
                              f"{SITE}/protocol/"),
          "python3-guestagent": (f"{SITE}/agent/", f"{SITE}/cli/", f"{SITE}/host/", "/bin/",
                                 "/etc/", "systemd")}


def deb_files(deb: Path) -> list[str]:
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    return [ln.split()[5] for ln in listing.splitlines() if not ln.endswith("/")]


def test_each_deb_ships_its_side_only(debs):
    owner: dict[str, str] = {}
    for name, deb in debs.items():
        files = deb_files(deb)
        for path in DEB_FILES[name]:
            assert path in files, f"{name} lacks {path}"
        for path in files:
            assert not any(bad in path for bad in NOT_IN[name]), f"{name} ships {path}"
            assert path.startswith("./usr/share/doc/") or path.startswith(
                "./usr/share/lintian/") or path not in owner, f"{path}: {owner.get(path)}, {name}"
            owner[path] = name
    conffiles = {n: set(run(["dpkg-deb", "-I", str(d), "conffiles"], check=False).stdout.split())
                 for n, d in debs.items()}
    assert conffiles == {
        "guestagent": {"/etc/guestagent/guestagent.toml", "/etc/default/guestagent"},
        "guestagent-host": {"/etc/guestagent-host/guestagent-host.toml",
                            "/etc/default/guestagent-host"},
        "python3-guestagent": set()}
    depends = {n: run(["dpkg-deb", "-f", str(d), "Depends"]).stdout for n, d in debs.items()}
    assert "python3-pyudev" in depends["guestagent"]
    assert "python3-pyudev" not in depends["guestagent-host"] + depends["python3-guestagent"]
    for side in ("guestagent", "guestagent-host"):
        assert f"python3-guestagent (= {__version__}-1)" in depends[side]


@pytest.mark.parametrize("name", ["guestagent", "guestagent-host"])
def test_an_upgrade_restarts_the_unit_and_removal_stops_it(debs, name, tmp_path):
    # The image tests watch this happen in a guest with systemd; the host package's
    # scripts are read here, since the host service cannot run under systemd on this
    # machine. An upgrade must not leave a running service stopped, and removal must
    # not leave it running without its files (for the host service, stopping it is
    # what restores QEMU's threads).
    run(["dpkg-deb", "-e", str(debs[name]), str(tmp_path)])
    unit = f"{name}.service"
    scripts = {s: (tmp_path / s).read_text() if (tmp_path / s).exists() else ""
               for s in ("preinst", "postinst", "prerm")}
    assert "try-restart" in scripts["postinst"] and unit in scripts["postinst"]
    assert f"deb-systemd-invoke stop {unit}" in scripts["prerm"]
    assert "deb-systemd-invoke stop" not in scripts["preinst"]


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
    assert installed.run("sh", "-c", "command -v guestagent-host", check=False).returncode != 0


def test_host_package_runs_without_the_guest_package(host_installed):
    """guestagent-host imports only its own modules and the shared ones."""
    proc = host_installed.run("guestagent-host", "--help")
    assert proc.stdout.startswith("usage: guestagent-host")
    assert "needs a transport" in host_installed.run(
        "guestagent-host", "run", "--pid", "1", check=False).stderr
    absent = host_installed.run("python3", "-c", "import guestagent.agent", check=False)
    assert absent.returncode != 0 and "No module named 'guestagent.agent'" in absent.stderr
    status = host_installed.run("guestagent-host", "status", "--status-socket",
                                "/run/none.sock", check=False)
    assert status.returncode == 1 and "no guestagent-host running" in status.stderr
    verify = host_installed.run("systemd-analyze", "verify",
                                "/lib/systemd/system/guestagent-host.service", check=False)
    assert verify.returncode == 0, verify.stderr
    assert host_installed.run("man", "-w", "guestagent-host").stdout.strip()


@pytest.mark.parametrize("side", ["guestagent", "guestagent-host"])
def test_installed_bash_completion(side, installed, host_installed):
    root = installed if side == "guestagent" else host_installed
    first = "status" if side == "guestagent" else "restore"
    script = (f". /usr/share/bash-completion/completions/{side}; "
              f"COMP_WORDS=({side} {first[:3]}); COMP_CWORD=1; "
              f"_{side.replace('-', '_')}; echo \"${{COMPREPLY[@]}}\"")
    proc = root.run("bash", "-c", script)
    assert first in proc.stdout.split(), proc.stdout + proc.stderr


def test_installed_man_pages_have_exit_status_signals_files(installed, host_installed):
    for root, page in ((installed, "guestagent"), (host_installed, "guestagent-host")):
        text = root.run("sh", "-c", f"MANWIDTH=80 man {page} | col -b").stdout
        for heading in ("EXIT STATUS", "SIGNALS", "FILES"):
            assert f"\n{heading}\n" in text, (page, heading)
        assert f"/usr/share/doc/{page}/cli-json.md" in text
        doc = root.run("sh", "-c", f"zcat /usr/share/doc/{page}/cli-json.md.gz | head -1")
        assert doc.stdout.startswith("# ")


def test_host_config_file_shows_the_defaults():
    """Uncommenting every key of the shipped host config (pin_cpus is an example) gives
    exactly the built-in limits."""
    from guestagent.host.config import HostLimits, parse_limits

    text = (PACKAGING / "etc" / "guestagent-host.toml").read_text()
    keys = [ln[1:] for ln in text.splitlines() if re.match(r"#[a-z_]+ = ", ln)
            and not ln.startswith("#pin_cpus")]
    assert len(keys) >= 10
    assert parse_limits("\n".join(keys), "shipped") == HostLimits()


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
    pages = installed.run("man", "-w", "guestagent", "guestagent.toml")
    assert len(pages.stdout.split()) == 2


def test_installed_unit_passes_systemd_analyze_verify(installed):
    # Needs the installed ExecStart binary and man pages, hence in the root.
    proc = installed.run("systemd-analyze", "verify", "/lib/systemd/system/guestagent.service",
                         check=False)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stderr


def test_a_config_written_before_the_package_stops_dpkg(debs, tmp_path):
    """Why cloud-init's user-data stages the config and moves it only once the package
    is installed: a file already at the conffile path, which no package owns, makes
    `dpkg -i` stop at the conffile prompt (here: end of file on stdin)."""
    root = InstallRoot(tmp_path)
    for name in ("python3-guestagent", "guestagent"):
        root.add(f"/root/{name}.deb", debs[name].read_bytes())
    root.add("/etc/guestagent/guestagent.toml", b"[policy]\n")
    proc = root.run("dpkg", "-i", "/root/python3-guestagent.deb", "/root/guestagent.deb",
                    check=False)
    assert proc.returncode != 0, proc.stdout
    assert "conffile prompt" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


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


RPM_FILES = {
    "guestagent": ("/usr/bin/guestagent", "/usr/lib/systemd/system/guestagent.service",
                   "/usr/lib/udev/rules.d/60-guestagent.rules",
                   "/usr/lib/sysusers.d/guestagent.conf",
                   "/etc/guestagent/guestagent.toml", "/etc/sysconfig/guestagent",
                   "/usr/share/man/man8/guestagent.8.gz",
                   "/usr/share/man/man5/guestagent.toml.5.gz",
                   "/usr/share/bash-completion/completions/guestagent",
                   "/usr/share/doc/guestagent/protocol.md",
                   "/usr/share/doc/guestagent/cli-json.md", "/usr/share/doc/guestagent/policy.md"),
    "guestagent-host": ("/usr/bin/guestagent-host",
                        "/usr/lib/systemd/system/guestagent-host.service",
                        "/etc/guestagent-host/guestagent-host.toml",
                        "/etc/sysconfig/guestagent-host",
                        "/usr/share/man/man8/guestagent-host.8.gz",
                        "/usr/share/bash-completion/completions/guestagent-host",
                        "/usr/share/doc/guestagent-host/host.md"),
    "python3-guestagent": (),
}


def test_rpm_payloads_run_with_debian_python(rpms, tmp_path):
    for name, rpm in rpms.items():
        files = rpm_payload(rpm, tmp_path / name)
        for path in RPM_FILES[name]:
            assert path in files, f"{name} lacks {path}"
        rel = "/" + SITE.split("/", 1)[1]
        assert not any(bad.replace(SITE, rel) in f.replace("python3.11/site-packages",
                                                           "python3/dist-packages")
                       for f in files for bad in NOT_IN[name]), name
    for side in ("guestagent", "guestagent-host"):
        # As installed: the side's package and the shared one in one root.
        root = tmp_path / f"{side}-root"
        rpm_payload(rpms[side], root)
        rpm_payload(rpms["python3-guestagent"], root)
        sitelib = next(root.glob("usr/lib/python3*/site-packages"))
        env = dict(CLEAN_ENV, PYTHONPATH=str(sitelib))
        script = root / "usr" / "bin" / side
        assert script.read_text().startswith("#!/usr/bin/python3\n")
        proc = subprocess.run(["/usr/bin/python3", str(script), "--version"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.stdout.strip() == f"{side} {__version__}", proc.stderr
    for unit, env_file in (("guestagent", "guestagent"), ("guestagent-host", "guestagent-host")):
        text = (tmp_path / unit / f"usr/lib/systemd/system/{unit}.service").read_text()
        assert f"EnvironmentFile=-/etc/sysconfig/{env_file}\n" in text
        assert "EnvironmentFile=-/etc/default/" not in text


def test_rpm_metadata(rpms):
    config = {n: set(run(["rpm", "-qp", "--configfiles", str(r)]).stdout.split())
              for n, r in rpms.items()}
    assert config == {
        "guestagent": {"/etc/guestagent/guestagent.toml", "/etc/sysconfig/guestagent"},
        "guestagent-host": {"/etc/guestagent-host/guestagent-host.toml",
                            "/etc/sysconfig/guestagent-host"},
        "python3-guestagent": set()}
    requires = {n: run(["rpm", "-qp", "--requires", str(r)]).stdout for n, r in rpms.items()}
    assert "python3-pyudev" in requires["guestagent"]
    assert "pyudev" not in requires["guestagent-host"] + requires["python3-guestagent"]
    for side in ("guestagent", "guestagent-host"):
        assert f"python3-guestagent = {__version__}-1" in requires[side]
    scripts = run(["rpm", "-qp", "--scripts", str(rpms["guestagent"])]).stdout
    assert "groupadd -r guestagent" in scripts


def test_rpmlint_is_clean(rpms):
    proc = run(["rpmlint", "-c", str(PACKAGING / "rpm" / "rpmlint.toml"),
                *map(str, rpms.values()), str(PACKAGING / "rpm" / "guestagent.spec")],
               check=False)
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
