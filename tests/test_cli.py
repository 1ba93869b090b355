"""The command line's shell: version, help, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
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
        # The document in the guest's schema style (docs/cli-json.md).
        doc = run_host("status", "--json", "--status-socket", str(status))
        doc = _json.loads(doc.stdout)
        assert doc["schema_version"] == 1
        assert doc["counters"] == {"apply_failures": 0, "bad_views": 0, "link_errors": 0,
                                   "rejected_hints": 0}
        assert [v["vcpu"] for v in doc["vcpus"]] == [0, 1]
        assert all(isinstance(v["cpus"], list) and all(isinstance(c, int) for c in v["cpus"])
                   for v in doc["vcpus"])
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    links = [ln for ln in err.splitlines() if "link region" in ln]
    assert links and links[0] != "guestagent-host: link region down", err


# --- escaping: a thread named to attack the terminal ---------------------------

EVIL = b"\x1b[2J\x1b]0;pwn\x07x"
SHOWN = "\\x1b[2J\\x1b]0;pwn\\x07x"


def assert_no_controls(text: str) -> None:
    """Nothing a terminal acts on: C0 (but newline), DEL, C1."""
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
    assert not bad, f"control characters reach the terminal: {bad!r}"


@pytest.fixture
def evil_thread():
    from helpers.threads import sched_thread

    with sched_thread(os.SCHED_FIFO, 10, comm=EVIL, cpus={0}) as t:
        yield t


@pytest.mark.root
@pytest.mark.parametrize("view", [("tasks", "--rt"), ("irqs",), ("cpus",), ("hints",)])
def test_views_escape_a_hostile_thread_name(view, evil_thread, tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "guestagent", *view, "--socket",
                           str(tmp_path / "none.sock")] if view[0] == "hints" else
                          [sys.executable, "-m", "guestagent", *view], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert_no_controls(proc.stdout + proc.stderr)
    if view[0] in ("tasks", "cpus", "hints"):  # the views that show thread names
        row = next(ln for ln in proc.stdout.splitlines() if SHOWN in ln)
        assert str(evil_thread.tid) in row
    if view[0] in ("tasks", "hints"):  # JSON carries the name exactly
        as_json = subprocess.run([*proc.args, "--json"], capture_output=True, text=True,
                                 timeout=60, env=env)
        assert EVIL.decode() in json_strings(json.loads(as_json.stdout))


def json_strings(doc) -> str:
    """Every string in a JSON document, joined: where a name would appear."""
    if isinstance(doc, str):
        return doc + "\n"
    if isinstance(doc, dict):
        return "".join(json_strings(v) for v in doc.values())
    if isinstance(doc, list):
        return "".join(json_strings(v) for v in doc)
    return ""


def test_escape_and_table():
    from guestagent.display import escape, table

    assert escape("a\tb\nc\x7f\x9b\u202e") == "a\\x09b\\x0ac\\x7f\\x9b\\u202e"
    assert escape("plain ünï 名") == "plain ünï 名"
    text = table(("A", "B"), [("x\ty", "1\n2")])
    assert text.splitlines() == ["A       B", "x\\x09y  1\\x0a2"]


# --- the agent's views: status, hints, watch --------------------------------------

@pytest.fixture
def agent(tmp_path):
    """`guestagent run` on a local region, its config under a directory whose name
    carries an escape sequence (shown in status)."""
    from helpers.agentproc import AgentProcess

    home = tmp_path / "cfg\x1b[2J"
    home.mkdir()
    cfg = home / "guestagent.toml"
    sock = tmp_path / "control.sock"
    cfg.write_text(f'[transport]\nmode = "local"\nlocal_region = "{tmp_path / "region"}"\n'
                   f'[control]\nsocket = "{sock}"\n[agent]\nsweep_interval_ms = 50\n')
    proc = AgentProcess(str(cfg), str(sock))
    proc.config = str(cfg)
    yield proc
    proc.kill()


def cli_on(agent, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guestagent", *args, "--socket", agent.socket],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.root
def test_status_escapes_and_json_is_exact(agent):
    text = cli_on(agent, "status")
    assert text.returncode == 0, text.stderr
    assert_no_controls(text.stdout)
    assert "cfg\\x1b[2J/guestagent.toml" in text.stdout
    doc = json.loads(cli_on(agent, "status", "--json").stdout)
    assert doc["config"] == agent.config and "ok" not in doc
    assert doc["transport"]["kind"] == "local"
    assert "host_heard_s" not in doc["transport"], "a host never heard has no heard time"


@pytest.mark.root
def test_hints_from_the_agent_escape_the_thread_name(agent, evil_thread):
    from helpers.waiting import wait_for

    def shown() -> str:
        proc = cli_on(agent, "hints")
        return proc.stdout if SHOWN in proc.stdout else ""
    assert wait_for(shown, 60), cli_on(agent, "hints").stdout
    assert_no_controls(shown())


@pytest.mark.root
def test_watch_into_a_pipe_is_plain_and_json_has_no_ok(agent, evil_thread):
    proc = cli_on(agent, "watch", "--count", "2", "--interval", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout
    assert_no_controls(proc.stdout)
    titles = [ln for ln in proc.stdout.splitlines() if re.match(r"\d\d:\d\d:\d\d  ", ln)]
    assert len(titles) == 2 and ("no change" in titles[1] or "changed:" in titles[1]), titles
    lines = cli_on(agent, "watch", "--json", "--count", "2", "--interval", "0.2").stdout
    docs = [json.loads(ln) for ln in lines.splitlines()]
    assert len(docs) == 2
    for doc in docs:
        assert set(doc) == {"status", "hints", "capacity"}
        assert all("ok" not in sub for sub in doc.values())
        assert EVIL.decode() in json_strings(doc["hints"]) or not doc["hints"]["vcpus"]


class Tmux:
    """A real terminal of a given size running one command (tmux, a private server)."""

    def __init__(self, tmp_path, cmd: list[str], width: int, height: int) -> None:
        self.base = ["tmux", "-S", str(tmp_path / "tmux.sock")]
        subprocess.run(self.base + ["new-session", "-d", "-s", "w", "-x", str(width), "-y",
                                    str(height), *cmd], check=True, timeout=30)

    def screen(self) -> str:
        return subprocess.run(self.base + ["capture-pane", "-p", "-t", "w"], capture_output=True,
                              text=True, timeout=30).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "w", *keys], check=True, timeout=30)

    def alive(self) -> bool:
        return subprocess.run(self.base + ["has-session", "-t", "w"], capture_output=True,
                              timeout=30).returncode == 0

    def close(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True, timeout=30)


@pytest.mark.root
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package tmux; "
                    ".ci/run installs it)")
def test_watch_on_a_terminal_fits_survives_restarts_and_quits(agent, tmp_path):
    from helpers.agentproc import AgentProcess
    from helpers.waiting import wait_for

    term = Tmux(tmp_path, [sys.executable, "-m", "guestagent", "watch", "--socket",
                           agent.socket, "--interval", "0.3"], 80, 12)
    try:
        assert wait_for(lambda: "errors" in term.screen(), 60), term.screen()
        screen = term.screen()
        lines = screen.rstrip("\n").split("\n")
        assert len(lines) <= 12 and all(len(ln) <= 80 for ln in lines)
        assert re.match(r"\d\d:\d\d:\d\d  \[\d+ lines below", lines[0]), lines[0]
        for row in ("agent", "config", "transport", "link", "hints", "errors"):
            assert any(ln.startswith(row) for ln in lines), (row, screen)
        pid = agent.proc.pid
        agent.kill()
        assert wait_for(lambda: "agent not answering" in term.screen(), 60), term.screen()
        assert "waiting for it" in term.screen()
        again = AgentProcess(agent.config, agent.socket)
        try:
            assert wait_for(lambda: "agent restarted" in term.screen(), 60), term.screen()
            assert str(pid) not in term.screen().split("\n")[0]
            term.keys("q")
            assert wait_for(lambda: not term.alive(), 30), "q did not quit watch"
        finally:
            again.kill()
    finally:
        term.close()


def test_host_status_escapes_what_a_guest_chose(tmp_path):
    """A status socket answering with control characters in every text field (as a
    guest's reason or a hostile peer might): the table shows them escaped."""
    import socket as _socket
    import threading

    doc = {"schema_version": 1, "qemu_pid": 1, "link": "region", "link_state": "refused",
           "link_reason": "refused guest: \x1b]0;pwn\x07", "guest_state": "run\x1b[2J",
           "generation": 1, "lease": "none", "lease_remaining": None, "dry_run": False,
           "counters": {"bad_views": 0}, "vcpus": [{
               "vcpu": 0, "tid": 5, "hint": {"request": "boost", "class": "fifo",
                                             "rt_priority": 9, "nice": 0, "flags": [],
                                             "group": 0},
               "applied": ["boosted\x9b"], "policy": "fifo\t9", "cpus": [0, 1], "pcpu": 0,
               "capacity": 10, "host_load": 0}]}
    path = str(tmp_path / "s.sock")
    server = _socket.socket(_socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(json.dumps(doc).encode() + b"\n")
    t = threading.Thread(target=answer, daemon=True)
    t.start()
    proc = run_host("status", "--status-socket", path)
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert_no_controls(proc.stdout)
    assert "\\x1b]0;pwn\\x07" in proc.stdout and "fifo\\x099" in proc.stdout
    assert "0-1" in proc.stdout


# --- JSON held to docs/cli-json.md --------------------------------------------------

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                    "cli-json.md")


def documented_fields(heading: str) -> set[str]:
    """The field names of the first table after the line `heading` in docs/cli-json.md."""
    lines = open(DOCS, encoding="utf-8").read().split("\n")
    start = lines.index(heading)
    rows = []
    for ln in lines[start + 1:]:
        if ln.startswith("|"):
            rows.append(ln)
        elif rows:
            break
    names: set[str] = set()
    for row in rows[2:]:
        names |= set(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    return names


@pytest.mark.root
def test_agent_json_matches_the_docs(agent):
    status = json.loads(cli_on(agent, "status", "--json").stdout)
    assert set(status) - {"schema_version"} == documented_fields("## `status`")
    hints = json.loads(cli_on(agent, "hints", "--json").stdout)
    assert set(hints) - {"schema_version"} == documented_fields("## `hints`")
    for h in hints["vcpus"]:
        assert set(h) - {"wanted", "held_until_s"} == \
            documented_fields("*hint*:") - {"wanted", "held_until_s"}
        assert set(h["flags"]) <= {"critical_irq", "pinned_critical", "latency_sleeper", "idle"}
    capacity = json.loads(cli_on(agent, "capacity", "--json").stdout)
    assert set(capacity) - {"schema_version"} == documented_fields("## `capacity`")


def test_host_json_matches_the_docs():
    """A peer's document, built by the peer's own code from a plan with one boost."""
    from guestagent.host.decide import Plan, VcpuPlan
    from guestagent.host.settings import ThreadSettings
    from guestagent.host.status import PeerSnapshot, status_document
    from guestagent.protocol.model import AppliedFlag, HintFlag, Request, SchedClass, VcpuHint

    settings = ThreadSettings(os.SCHED_FIFO, 30, 0, frozenset({0, 1}))
    hint = VcpuHint(0, Request.BOOST, SchedClass.FIFO, 30, 0, HintFlag.CRITICAL_IRQ, 0)
    plan = Plan({0: VcpuPlan(0, settings, AppliedFlag.BOOSTED, hint)})
    doc = status_document(PeerSnapshot(
        pid=1, link="region", guest_state="running", generation=1, plan=plan,
        current={0: settings}, tids={0: 5}, published={}, counters={}, dry_run=False,
        now=0.0))
    assert set(doc) == documented_fields(
        "# `guestagent-host status --json`: the host peer's state")
    assert doc["schema_version"] == 1
    assert doc["counters"] == {"apply_failures": 0, "bad_views": 0, "link_errors": 0,
                               "rejected_hints": 0}
    (v,) = doc["vcpus"]
    assert set(v) == documented_fields("*host vcpu*:")
    assert v["cpus"] == [0, 1] and v["applied"] == ["boosted"]
    assert v["hint"]["flags"] == ["critical_irq"]
    assert set(v["hint"]) == documented_fields("*hint*:") - {"vcpu", "reasons", "wanted",
                                                             "held_until_s"}
