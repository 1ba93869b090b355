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
from guestagent.cli.cloudinit import user_data, yaml_text

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
def test_schema_check_rejects_a_wrong_type(tmp_path):
    # The validator really validates: defer must be a boolean.
    bad = tmp_path / "bad.yaml"
    bad.write_text((CLOUD_INIT / "user-data.yaml").read_text()
                   .replace("defer: true", "defer: later"))
    proc = schema_check(bad)
    assert proc.returncode != 0 and "defer" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name,flags", sorted(SHIPPED.items()))
def test_shipped_file_is_the_commands_output(name, flags):
    """The files are the command's output for the example config, so they cannot drift."""
    proc = subprocess.run([sys.executable, "-m", "guestagent", "cloud-init", "--config",
                           "cloud-init/guestagent.toml", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (CLOUD_INIT / name).read_text(), \
        f"regenerate cloud-init/{name} (see cloud-init/guestagent.toml)"


def test_user_data_installs_writes_deferred_and_enables():
    doc = yaml.safe_load((CLOUD_INIT / "user-data.yaml").read_text())
    assert doc["packages"] == ["guestagent"]
    (entry,) = doc["write_files"]
    assert entry["path"] == "/etc/guestagent/guestagent.toml" and entry["defer"] is True
    assert entry["content"] == EXAMPLE.read_text()
    parse_config(entry["content"].encode(), "embedded")
    assert doc["runcmd"] == [["systemctl", "enable", "guestagent.service"],
                             ["systemctl", "restart", "guestagent.service"]]
    preinstalled = yaml.safe_load((CLOUD_INIT / "vendor-data.yaml").read_text())
    assert "packages" not in preinstalled
    assert preinstalled["write_files"] == doc["write_files"]


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
    assert doc["runcmd"][0] == ["systemctl", "enable", "guestagent.service"]

