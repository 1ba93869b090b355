"""cloud-init user-data: the shipped files and `guestagent cloud-init`.

Validated with Debian's cloud-init (`cloud-init schema -c FILE`) and read
back with PyYAML, the parser cloud-init itself uses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from guestagent.agent.config import parse_config, render_default_toml
from guestagent.cli.cloudinit import STAGED_PATH, user_data, yaml_text

ROOT = Path(__file__).resolve().parent.parent
CLOUD_INIT = ROOT / "cloud-init"
EXAMPLE = CLOUD_INIT / "guestagent.toml"
SHIPPED = {"user-data.yaml": (), "vendor-data.yaml": ("--installed",)}
CLOUD_INIT_BIN = "/usr/bin/cloud-init"

needs_cloud_init = pytest.mark.skipif(
    not Path(CLOUD_INIT_BIN).exists(),
    reason="Debian's cloud-init is not installed (.ci/run installs it)")


def guestagent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guestagent", *args],
                          capture_output=True, text=True, timeout=60)


def schema_check(path: Path) -> subprocess.CompletedProcess:
    # Debian's cloud-init runs on Debian's python3, not the test interpreter.
    return subprocess.run([CLOUD_INIT_BIN, "schema", "-c", str(path)], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


@needs_cloud_init
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_is_valid_cloud_config(name):
    proc = schema_check(CLOUD_INIT / name)
    assert proc.returncode == 0 and "Valid cloud-config" in proc.stdout, proc.stderr


@needs_cloud_init
def test_image_tests_system_config_is_valid_cloud_config(tmp_path):
    """The guest image's own cloud.cfg.d file (testbed/image.py): cloud-init merges it with
    the user-data and warns "Invalid cloud-config provided" at boot if it is not valid."""
    from testbed.image import CLOUD_CFG

    path = tmp_path / "90-guestagent-testbed.cfg"
    path.write_text("#cloud-config\n" + CLOUD_CFG)
    proc = schema_check(path)
    assert proc.returncode == 0 and "Valid cloud-config" in proc.stdout, proc.stderr


@needs_cloud_init
def test_schema_check_rejects_a_wrong_type(tmp_path):
    # The validator really validates: package_update must be a boolean.
    bad = tmp_path / "bad.yaml"
    bad.write_text((CLOUD_INIT / "user-data.yaml").read_text()
                   .replace("package_update: true", "package_update: later"))
    proc = schema_check(bad)
    assert proc.returncode != 0 and "package_update" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name,flags", sorted(SHIPPED.items()))
def test_shipped_file_is_the_commands_output(name, flags):
    """The files are the command's output for the example config, so they cannot drift."""
    proc = subprocess.run([sys.executable, "-m", "guestagent", "cloud-init", "--config",
                           "cloud-init/guestagent.toml", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (CLOUD_INIT / name).read_text(), \
        f"regenerate cloud-init/{name} (see cloud-init/guestagent.toml)"


def test_user_data_installs_then_moves_the_staged_config_and_enables():
    doc = yaml.safe_load((CLOUD_INIT / "user-data.yaml").read_text())
    assert doc["packages"] == ["guestagent"]
    (entry,) = doc["write_files"]
    # Staged outside the package's conffile path: see install_script_* below.
    assert entry["path"] == STAGED_PATH and "defer" not in entry
    assert entry["content"] == EXAMPLE.read_text()
    parse_config(entry["content"].encode(), "embedded")
    ((sh, flags, script),) = doc["runcmd"]
    assert (sh, flags) == ("sh", "-ec")
    assert f"install -m 0644 {STAGED_PATH} /etc/guestagent/guestagent.toml" in script
    assert script.index("install -m") < script.index("systemctl enable guestagent.service") \
        < script.index("systemctl restart guestagent.service")
    preinstalled = yaml.safe_load((CLOUD_INIT / "vendor-data.yaml").read_text())
    assert "packages" not in preinstalled
    assert preinstalled["write_files"] == doc["write_files"]
    assert preinstalled["runcmd"] == doc["runcmd"]


def run_install_script(tmp_path: Path, with_package: bool) -> subprocess.CompletedProcess:
    """runcmd's script under sh with the paths moved into tmp_path and stand-in
    guestagent and systemctl commands on PATH (no systemd is PID 1 here)."""
    script = yaml.safe_load((CLOUD_INIT / "user-data.yaml").read_text())["runcmd"][0][2]
    staged, conf, bin_dir = tmp_path / "staged.toml", tmp_path / "etc/guestagent.toml", \
        tmp_path / "bin"
    staged.write_text(EXAMPLE.read_text())
    conf.parent.mkdir()
    bin_dir.mkdir()
    stubs = {"systemctl": f'echo "$@" >> {tmp_path}/systemctl.log\n'}
    if with_package:
        stubs["guestagent"] = "exit 0\n"
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    script = script.replace(STAGED_PATH, str(staged)).replace(
        "/etc/guestagent/guestagent.toml", str(conf))
    return subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin"})


def test_install_script_without_the_package_fails_and_writes_nothing(tmp_path):
    proc = run_install_script(tmp_path, with_package=False)
    assert proc.returncode == 1 and "guestagent is not installed" in proc.stderr
    assert not (tmp_path / "etc/guestagent.toml").exists()
    assert not (tmp_path / "systemctl.log").exists()


def test_install_script_with_the_package_moves_the_config_and_restarts(tmp_path):
    proc = run_install_script(tmp_path, with_package=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "etc/guestagent.toml").read_text() == EXAMPLE.read_text()
    assert not (tmp_path / "staged.toml").exists()
    assert (tmp_path / "systemctl.log").read_text() == \
        "enable guestagent.service\nrestart guestagent.service\n"


@needs_cloud_init
def test_command_output_for_absent_default_config_is_valid(tmp_path):
    # No --config and no /etc/guestagent/guestagent.toml on this machine: the
    # agent runs on defaults, so the user-data carries the default file.
    if Path("/etc/guestagent/guestagent.toml").exists():
        pytest.skip("/etc/guestagent/guestagent.toml exists here; this test needs it absent")
    proc = guestagent("cloud-init")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "ud.yaml"
    out.write_text(proc.stdout)
    assert schema_check(out).returncode == 0
    assert yaml.safe_load(proc.stdout)["write_files"][0]["content"] == render_default_toml()


def test_invalid_config_is_a_one_line_error(tmp_path):
    bad = tmp_path / "g.toml"
    bad.write_text("[agent]\nsweep_interval_ms = \"fast\"\n")
    proc = guestagent("cloud-init", "--config", str(bad))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert str(bad) in proc.stderr


@pytest.mark.parametrize("make", ["missing", "directory", "binary"])
def test_unreadable_config_is_a_one_line_error(tmp_path, make):
    path = tmp_path / "g.toml"
    if make == "directory":
        path.mkdir()
    elif make == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    proc = guestagent("cloud-init", "--config", str(path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_round_trips_through_yaml(text):
    doc = yaml.safe_load("content: " + yaml_text(text, indent=2) + "\nnext: 1\n")
    assert doc == {"content": text, "next": 1}


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=200),
       st.text(min_size=1, max_size=60))
def test_user_data_embeds_any_config_text_exactly(text, source):
    doc = yaml.safe_load(user_data(text, source=source))
    assert doc["write_files"][0]["content"] == text
    assert doc["runcmd"][0][:2] == ["sh", "-ec"]



def test_absent_default_config_is_not_claimed():
    if Path("/etc/guestagent/guestagent.toml").exists():
        pytest.skip("/etc/guestagent/guestagent.toml exists here; this test needs it absent")
    head = guestagent("cloud-init").stdout.splitlines()[1]
    assert "built-in defaults" in head and "does not exist" in head
    assert "configuration from /etc/guestagent/guestagent.toml." not in head


@needs_cloud_init
@pytest.mark.parametrize("flags, check", [
    (("--apt-source", "deb https://pkgs.example.org/debian stable main"),
     lambda d: d["apt"]["sources"]["guestagent.list"]["source"]
     == "deb https://pkgs.example.org/debian stable main" and "key" not in
     d["apt"]["sources"]["guestagent.list"]),
    (("--yum-baseurl", "https://pkgs.example.org/el9", "--repo-key",
      "https://pkgs.example.org/key.asc"),
     lambda d: d["yum_repos"]["guestagent"] == {
         "name": "guestagent", "baseurl": "https://pkgs.example.org/el9", "enabled": True,
         "gpgcheck": True, "gpgkey": "https://pkgs.example.org/key.asc"}),
])
def test_package_source_option_is_valid_cloud_config(tmp_path, flags, check):
    proc = guestagent("cloud-init", "--config", str(EXAMPLE), *flags)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "ud.yaml"
    out.write_text(proc.stdout)
    assert schema_check(out).returncode == 0, schema_check(out).stdout
    doc = yaml.safe_load(proc.stdout)
    assert check(doc) and doc["packages"] == ["guestagent"]


def test_apt_key_file_is_embedded(tmp_path):
    key = tmp_path / "key.asc"
    key.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBF\n"
                   "-----END PGP PUBLIC KEY BLOCK-----\n")
    proc = guestagent("cloud-init", "--config", str(EXAMPLE), "--apt-source",
                      "deb [signed-by=$KEY_FILE] https://x/debian stable main",
                      "--repo-key", str(key))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["apt"]["sources"]["guestagent.list"]["key"] == \
        key.read_text()


@pytest.mark.parametrize("flags, words", [
    (("--apt-source", "https://x stable main"), "sources.list line"),
    (("--yum-baseurl", "pkgs.example.org"), "expected a URL"),
    (("--repo-key", "k.asc"), "needs --apt-source or --yum-baseurl"),
    (("--installed", "--apt-source", "deb https://x s m"), "installs nothing"),
    (("--apt-source", "deb https://x s m\nruncmd: [x]"), "one printable line"),
])
def test_package_source_errors_are_one_line(flags, words):
    proc = guestagent("cloud-init", "--config", str(EXAMPLE), *flags)
    assert proc.returncode == 1 and words in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
