"""The service's [host] table, the Prometheus textfile and the journald log lines."""

from __future__ import annotations

import io

import pytest

from guestagent.errors import ConfigError
from guestagent.host.hostlog import ERR, HostLog
from guestagent.host.serviceconfig import parse_service
from guestagent.host.textfile import ThreadMetrics, VmMetrics, render


def test_host_table_beside_per_vm_limits():
    s = parse_service('max_boosted = 1\n[host]\nmax_boosted = 3\nemulator = "always"\n'
                      'boost_budget = 0.25\nlibvirt_domains = ["web-*"]\n')
    assert s.limits.max_boosted == 1 and s.arbiter.host == 3 and s.arbiter.budget == 0.25
    assert s.emulator_policy("kvm") == "always" and s.libvirt_domains == ("web-*",)
    default = parse_service("")
    assert default.emulator_policy("tcg") == "follow"
    assert default.emulator_policy("kvm") == "never"


@pytest.mark.parametrize("text, message", [
    ("max_boosted = 1\n[host]\nmax_boosted = -3\n", "f.toml:3: host.max_boosted must be at least 0"),
    ('[host]\nemulator = "sometimes"\n',
     "f.toml:2: host.emulator must be one of follow, never, always"),
    ("[host]\nbogus = 1\n", "f.toml:2: unknown key host.bogus"),
    ('[host]\ndropin_dir = "relative"\n', "f.toml:2: host.dropin_dir must be an absolute path"),
    ('[host]\nlibvirt_domains = ["web-*", ""]\n',
     "f.toml:2: host.libvirt_domains must be a list of non-empty strings"),
    ('[host]\nmetrics_textfile = "x.prom"\n',
     'f.toml:2: host.metrics_textfile must be an absolute path or ""'),
    ("host = 5\n", "f.toml:1: host must be a table"),
    ("[host]\nboost_budget = true\n", "f.toml:2: host.boost_budget must be a number"),
    ("max_boosted = -1\n[host]\nbogus = 1\n", "f.toml:1: max_boosted must be at least 0"),
])
def test_bad_host_keys_name_file_and_line(text, message):
    with pytest.raises(ConfigError) as err:
        parse_service(text, "f.toml")
    assert str(err.value) == message


def test_empty_textfile_means_none_and_defaults_match_the_schema():
    from guestagent.agent.config import toml_value
    from guestagent.host.serviceconfig import SCHEMA, ServiceSettings

    assert parse_service('[host]\nmetrics_textfile = ""\n').metrics_textfile == ""
    text = "[host]\n" + "".join(f"{key.name} = {toml_value(key.default)}\n" for key in SCHEMA
                                if key.default is not None)
    assert parse_service(text) == ServiceSettings()


def test_textfile_escapes_labels_and_counts():
    text = render([ThreadMetrics('v"1\n', "0", 1.5, 2, 3, 4)], [VmMetrics("v", True, 7)])
    assert 'guestagent_host_boosted_seconds_total{vm="v\\"1\\n",thread="0"} 1.500' in text
    assert "guestagent_host_eperm_total" in text and "# TYPE" in text
    assert 'guestagent_host_lease_expiries_total{vm="v"} 7' in text


def test_log_lines_carry_a_journald_priority_under_systemd():
    out = io.StringIO()
    log = HostLog(stream=out, environ={"JOURNAL_STREAM": "8:1"})
    log("vm: trapped", ERR)
    log("cannot set x")
    log("hello\nworld")
    log("vCPU 0: fifo 1")  # routine: only with -v
    assert out.getvalue().splitlines() == ["<3>vm: trapped", "<4>cannot set x",
                                          "<6>hello\\nworld"]
    out = io.StringIO()
    HostLog(stream=out, environ={})("plain")
    assert out.getvalue() == "guestagent-host: plain\n"
