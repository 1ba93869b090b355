"""What the scheduler watch says when tracefs is missing or closed to the user."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from guestagent.observe.schedwatch import read_tracepoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534


def fake_tracefs(root) -> str:
    """A tracefs-shaped tree holding one tracepoint, readable by root only."""
    point = root / "tracing" / "events" / "syscalls" / "sys_enter_sched_setscheduler"
    point.mkdir(parents=True)
    (point / "id").write_text("42\n")
    (point / "format").write_text("\tfield:int pid;\toffset:16;\tsize:8;\tsigned:0;\n")
    os.chmod(root / "tracing", 0o700)
    return str(root / "tracing")


def test_root_reads_the_tracepoint(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: the tree is made root-only")
    point = read_tracepoint("sys_enter_sched_setscheduler", [fake_tracefs(tmp_path)])
    assert point.id == 42 and point.offsets["pid"] == 16


def test_an_unprivileged_user_is_told_permission_denied_not_not_found(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: to run the check as an unprivileged user")
    os.chmod(tmp_path, 0o755)
    root = fake_tracefs(tmp_path)
    code = ("import sys; from guestagent.observe.schedwatch import read_tracepoint\n"
            "try:\n read_tracepoint('sys_enter_sched_setscheduler', [sys.argv[1]])\n"
            "except OSError as err: print(err.errno, err)\n")
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    out = subprocess.run([python, "-c", code, root], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, user=NOBODY, group=NOBODY,
                         env={**os.environ, "PYTHONPATH": ROOT})
    if "No module named" in out.stderr or "Permission denied: '/" in out.stderr:
        pytest.skip(f"user {NOBODY} cannot read the source tree at {ROOT}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("13 ") and "permission denied" in out.stdout, out.stdout
    assert "not found" not in out.stdout


def test_a_missing_tracefs_is_not_found():
    with pytest.raises(OSError, match="is tracefs mounted"):
        read_tracepoint("sys_enter_sched_setscheduler", ["/nonexistent"])
