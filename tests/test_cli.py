"""The command line's shell: version, help, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


# --- arguments: one clear line, non-zero exit, no traceback --------------------

def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("argv, words", [
    (("irqs", "--interval", "inf"), ("--interval", "'inf'", "86400")),
    (("irqs", "--interval", "-1"), ("--interval", "'-1'")),
    (("irqs", "--interval", "nan"), ("--interval", "'nan'")),
    (("cpus", "--interval", "1e400"), ("--interval",)),
    (("tasks", "--cpu", "-1"), ("--cpu", "start at 0")),
    (("tasks", "--cpu", "x"), ("--cpu", "not a CPU number")),
    (("watch", "--count", "0"), ("--count", "1 or more")),
    (("watch", "--count", "-1"), ("--count", "1 or more")),
    (("watch", "--interval", "0"), ("--interval", "0.1")),
    (("watch", "--interval", "inf"), ("--interval",)),
])
def test_bad_values_are_refused_at_parse_time(argv, words):
    assert_one_line_error(run_cli(*argv), *words)


@pytest.mark.root
def test_cpu_that_does_not_exist_names_the_valid_ones():
    online = open("/sys/devices/system/cpu/possible").read().strip()
    for view in ("tasks", "irqs"):
        proc = run_cli(view, "--cpu", "99")
        assert_one_line_error(proc, "--cpu 99", f"CPUs {online}")
        assert proc.stdout == ""


def test_config_check_and_dump_take_the_file_both_ways(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text('[[rule]]\nname = "a"\ncomm = "x"\n')
    for args in (("check", str(cfg)), ("check", "--config", str(cfg))):
        proc = run_cli("config", *args)
        assert proc.returncode == 0 and proc.stdout == f"{cfg}: OK (1 rule)\n", proc.stderr
        assert proc.stderr == ""
    dumps = {run_cli("config", "dump", *a).stdout for a in ((str(cfg),), ("--config", str(cfg)))}
    assert len(dumps) == 1 and f"from {cfg}" in dumps.pop()
    cfg.write_text('[[rule]]\nname = "a"\ncomm = "x"\n[[rule]]\nname = "b"\ncomm = "y"\n')
    assert run_cli("config", "check", str(cfg)).stdout == f"{cfg}: OK (2 rules)\n"
    assert_one_line_error(run_cli("config", "check", str(cfg), "--config", "/x"), "two files")
    assert_one_line_error(run_cli("config", "dump", str(tmp_path / "absent.toml")),
                          "absent.toml")


def test_config_check_warns_about_settings_without_effect(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text('[[rule]]\nname = "steered"\ncomm = "x"\nsteer = true\n'
                   '[[rule]]\nname = "niced"\ncomm = "y"\nsched = "fifo"\nnice = -5\n'
                   '[[rule]]\nname = "fine"\ncomm = "z"\nsched = "other"\nnice = -5\n')
    proc = run_cli("config", "check", str(cfg))
    assert proc.returncode == 0 and proc.stdout == f"{cfg}: OK (3 rules)\n"
    warnings = proc.stderr.splitlines()
    assert len(warnings) == 2, proc.stderr
    assert "rule 'steered': steer = true has no effect while [steering] enabled = false" \
        in warnings[0]
    assert "rule 'niced': nice is ignored with sched = 'fifo'" in warnings[1]
    cfg.write_text('[steering]\nenabled = true\n[[rule]]\nname = "s"\ncomm = "x"\nsteer = true\n')
    assert run_cli("config", "check", str(cfg)).stderr == ""


def run_host(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guestagent.host.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv, words", [
    (("--contend", "0="), ("'0='", "VCPU=CAPACITY")),
    (("--contend", "-1"), ("'-1'", "vCPU numbers start at 0")),
    (("--contend", "0=2000"), ("capacity must be 0..1024",)),
])
def test_host_contend_values(argv, words):
    assert_one_line_error(run_host("run", "--pid", "1", "--region", "/dev/null", *argv), *words)


@pytest.mark.root
def test_host_run_checks_transport_and_vm(standin, tmp_path):
    base = ("run", "--qmp", standin.qmp, "--dry-run", "--state-dir", str(tmp_path / "st"),
            "--status-socket", str(tmp_path / "status.sock"))
    assert_one_line_error(run_host(*base), "needs a transport", "--channel", "--region")
    assert_one_line_error(run_host(*base, "--region", str(tmp_path / "r"), "--listen"),
                          "--listen applies to --channel only")
    assert_one_line_error(run_host(*base, "--region", str(tmp_path), "--contend", "1"),
                          "a directory, not a region file")
    assert_one_line_error(run_host(*base, "--region", str(tmp_path / "r"), "--contend", "5"),
                          "--contend 5", "vCPUs 0-1")
    cfg = tmp_path / "host.toml"
    cfg.write_text("pin_cpus = [0, 99]\n")
    assert_one_line_error(run_host(*base, "--region", str(tmp_path / "r"), "--config",
                                   str(cfg)), "pin_cpus: CPU 99 is not online")


@pytest.mark.root
def test_host_region_of_random_bytes_says_what_it_is(standin, tmp_path):
    """Mapped but never formatted by a guest: the reason says so, and the first link line
    comes after the first attempt (not a 'down' before anything was tried)."""
    import json as _json
    import socket as _socket

    from helpers.waiting import wait_for

    region = tmp_path / "region"
    region.write_bytes(os.urandom(1 << 20))
    status = tmp_path / "status.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "guestagent.host.cli", "run", "--qmp", standin.qmp, "--dry-run",
         "--region", str(region), "--state-dir", str(tmp_path / "st"),
         "--status-socket", str(status)], stderr=subprocess.PIPE, text=True)
    try:
        def reason() -> str:
            try:
                with _socket.socket(_socket.AF_UNIX) as s:
                    s.settimeout(5)
                    s.connect(str(status))
                    return _json.loads(s.makefile().readline())["link_reason"]
            except (OSError, ValueError):
                return ""
        assert wait_for(lambda: reason() not in ("", "region not mapped yet"), 60), reason()
        assert "mapped" not in reason() or "not written" in reason()
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    links = [ln for ln in err.splitlines() if "link region" in ln]
    assert links and links[0] != "guestagent-host: link region down", err
