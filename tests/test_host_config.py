"""Host config: strict TOML with file:line errors."""

from __future__ import annotations

from dataclasses import fields

import pytest

from guestagent.errors import ConfigError
from guestagent.host.config import SCHEMA, HostLimits, load_limits, parse_limits


def test_defaults_without_file():
    assert load_limits(None) == HostLimits()


def test_full_file_parses():
    limits = parse_limits(
        'max_rt_priority = 20\nrt_policies = ["rr"]\nmax_boosted = 1\n'
        "heartbeat_period = 0.5\nlease_periods = 2\npin_cpus = [0, 1]\n"
        "colocation = false\nnice_floor = -5\ncontend = { 1 = 100 }\n")
    assert limits.max_rt_priority == 20 and limits.rt_policies == (2,)
    assert limits.lease == 1.0 and limits.pin_cpus == frozenset({0, 1})
    assert limits.contend == {1: 100} and not limits.colocation


@pytest.mark.parametrize("text,line,words", [
    ("max_boosted = 1\nmax_rt_priority = 100\n", 2, "max_rt_priority must be at most 99"),
    ("\n\nlease_periods = 3\n", 3, "lease_periods must be at most 2"),
    ("lease_periods = 0\n", 1, "lease_periods must be more than 0"),
    ("rt_policies = [\"deadline\"]\n", 1, "rt_policies must be a list, each one of fifo, rr"),
    ("colocation = 1\n", 1, "colocation must be true or false"),
    ("max_rt_prio = 5\n", 1, "unknown key max_rt_prio"),
    ("contend = { x = 5 }\n", 1, "contend keys must be whole numbers, not 'x'"),
    ("\ncontend = { 1 = 2000 }\n", 2, "contend.1 must be an integer from 0 to 1024"),
    ("pin_cpus = [0, 4096]\n", 1, "pin_cpus must be a list of integers from 0 to 4095"),
    ("heartbeat_period = nan\n", 1, "heartbeat_period must be at least 0.01"),
    ("max_boosted = [\n", 1, ""),
    ("a = 1\nb = = 2\n", 2, ""),
])
def test_bad_values_name_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "host.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_limits(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}: {words}") and "\n" not in msg


def test_schema_defaults_are_the_built_in_limits():
    """The defaults the schema documents are the ones HostLimits() uses."""
    from guestagent.agent.config import toml_value

    text = "".join(f"{key.name} = {toml_value(key.default)}\n" for key in SCHEMA
                   if key.default is not None)
    assert parse_limits(text) == HostLimits()
    assert {key.name for key in SCHEMA} == {f.name for f in fields(HostLimits)}


def test_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_limits(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_limits(str(bad))


def test_every_schema_key_of_the_host_files_is_documented():
    from pathlib import Path

    from guestagent.host import dropins, serviceconfig

    doc = (Path(__file__).resolve().parent.parent / "docs" / "host.md").read_text()
    for key in SCHEMA + serviceconfig.SCHEMA:
        assert f"| `{key.name}` |" in doc, key.name
    for key in dropins.SCHEMA:
        assert f"{key.name} =" in doc, key.name
