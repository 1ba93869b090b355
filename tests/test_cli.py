"""The command line's shell: version, help, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

from guestagent import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guestagent", *args],
                          capture_output=True, text=True, timeout=60)


def test_version_prints_package_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"guestagent {__version__}"


def test_unknown_subcommand_is_one_line_error():
    proc = run_cli("no-such-command")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_reader_closing_the_pipe_early_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "guestagent", "tasks", "--all", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0
    assert "BrokenPipe" not in err and "Traceback" not in err
