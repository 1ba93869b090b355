"""Config parsing: defaults, strict validation with file:line, rules, rendering."""

from __future__ import annotations

import pytest

from guestagent.agent.config import (
    SCHEMA,
    default_config,
    load_config,
    parse_config,
    render_config,
    render_default_toml,
)
from guestagent.errors import ConfigError
from guestagent.linux.procfs import systemd_unit
from guestagent.protocol.model import SchedClass


def test_shipped_default_file_parses_to_the_defaults():
    assert parse_config(render_default_toml().encode()).values == default_config().values


def test_every_key_is_documented_in_the_shipped_file():
    text = render_default_toml()
    for key in SCHEMA:
        assert f"#{key.name} = " in text
        assert key.doc.split()[0] in text


def test_values_override_defaults():
    cfg = parse_config(b"[policy]\nhold_time_ms = 500\n[steering]\nenabled = true\n")
    assert cfg.policy["hold_time_ms"] == 500
    assert cfg.steering["enabled"] is True
    assert cfg.agent["sweep_interval_ms"] == 100


@pytest.mark.parametrize("text, message", [
    (b"[agent]\n\nsweep_interval_ms = 'fast'\n", "f.toml:3: agent.sweep_interval_ms must be an integer"),
    (b"[agent]\nsweep_interval_ms = 1\n", "f.toml:2: agent.sweep_interval_ms must be at least 10"),
    (b"[policy]\nunboost = 1\n", "f.toml:2: policy.unboost must be true or false"),
    (b"[policy]\nfloating_rt = 'some'\n", "f.toml:2: policy.floating_rt must be one of last_cpu, all, ignore"),
    (b"[policy]\ncritical_irqs = [1]\n", "f.toml:2: policy.critical_irqs must be a list of strings"),
    (b"[agent]\nbogus = 1\n", "f.toml:2: unknown key agent.bogus"),
    (b"\n[nosuch]\nx = 1\n", "f.toml:2: unknown section [nosuch]"),
    (b"[[rule]]\nname = 'a'\n", "f.toml:1: rule 'a' matches nothing"),
    (b"[[rule]]\ncomm = 'x'\n", "f.toml:1: rule needs a name"),
    (b"[[rule]]\nname='a'\ncomm='x'\n[[rule]]\nname='a'\ncomm='y'\n",
     "f.toml:4: duplicate rule name 'a'"),
    (b"[[rule]]\nname='a'\ncomm='x'\npriority = 100\n", "f.toml:4: rule.priority must be at most 99"),
    (b"[[rule]]\nname='a'\ncomm='x'\n[[rule]]\nname='b'\nfoo=1\n", "f.toml:6: unknown key rule.foo"),
    (b"[agent\n", "f.toml:1: "),  # the line from the text, whatever the parser
    (b"\xff\xfe", "f.toml: not UTF-8"),
])
def test_invalid_config_names_file_and_line(text, message):
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.toml")
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_rules_parse_and_match():
    cfg = parse_config(b"""
[[rule]]
name = "audio"
unit = "pipewire*.service"
sched = "rr"
priority = 70
steer = true

[[rule]]
name = "game"
comm = "game-*"
exe = "/opt/*"
sched = "other"
nice = -5
""")
    audio, game = cfg.rules
    assert audio.sched_class is SchedClass.RR and audio.priority == 70 and audio.steer
    assert audio.matches("pw-data", "/user.slice/user-1000.slice/user@1000.service/"
                         "session.slice/pipewire.service", "/usr/bin/pipewire")
    assert not audio.matches("pw-data", "/system.slice/cron.service", "/usr/bin/pipewire")
    assert game.matches("game-main", "", "/opt/game/bin")
    assert not game.matches("game-main", "", "/usr/bin/game"), "every set pattern must match"
    assert game.sched_class is SchedClass.OTHER and game.nice == -5


def test_rules_use_the_unit_the_cli_shows():
    assert systemd_unit("/system.slice/ssh.service") == "ssh.service"
    assert systemd_unit("/user.slice/user-0.slice/session-3.scope") == "session-3.scope"
    assert systemd_unit("/") == ""
    rule = parse_config(b"[[rule]]\nname='a'\nunit='user@1000.service'\n").rules[0]
    assert rule.matches("x", "/user.slice/user-1000.slice/user@1000.service/app.slice", "")


def test_dump_round_trips():
    cfg = parse_config(b"[policy]\ncritical_netdevs = ['eth0']\n[[rule]]\nname='a'\ncomm='x'\n")
    again = parse_config(render_config(cfg).encode())
    assert again.values == cfg.values and again.rules == cfg.rules


def test_missing_and_unreadable_files(tmp_path):
    assert load_config(str(tmp_path / "none.toml"), missing_ok=True) == default_config()
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("text, message", [
    ('[control]\nsocket = ""\n', "f.toml:2: control.socket must be an absolute path, not ''"),
    ('\n[control]\nsocket = "ctl.sock"\n',
     "f.toml:3: control.socket must be an absolute path, not 'ctl.sock'"),
    ('[control]\nsocket = "/nonexistent-ga/dir/ctl.sock"\n',
     "f.toml:2: control.socket: directory /nonexistent-ga/dir does not exist"),
    ('[transport]\nlocal_region = "/nonexistent-ga/dir/region"\n',
     "f.toml:2: transport.local_region: directory /nonexistent-ga/dir does not exist"),
    ('[metrics]\n\ntextfile_dir = "/nonexistent-ga/textfile"\n',
     "f.toml:3: metrics.textfile_dir: directory /nonexistent-ga/textfile does not exist"),
])
def test_paths_the_daemon_cannot_use_safely_are_refused(text, message):
    with pytest.raises(ConfigError) as err:
        parse_config(text.encode(), "f.toml")
    assert str(err.value) == message


def test_the_daemons_own_run_directory_and_existing_ones_are_accepted(tmp_path):
    cfg = parse_config(f'[control]\nsocket = "/run/guestagent/x.sock"\n[transport]\n'
                       f'local_region = "{tmp_path}/r"\n[metrics]\ntextfile_dir = "{tmp_path}"\n'
                       .encode())
    assert cfg.control["socket"] == "/run/guestagent/x.sock"


def test_a_toml_syntax_error_names_the_line_from_the_text_whatever_the_parser():
    # tomli (Python 3.9, 3.10) and tomllib word and place their errors differently; the
    # line comes from the document, so both interpreters report the same `file:line:`.
    with pytest.raises(ConfigError) as err:
        parse_config(b"[agent]\nhold_time_ms = 100\nsweep = [\n", "/etc/g.toml")
    assert str(err.value).startswith("/etc/g.toml:3: ") and "(at line" not in str(err.value)
