"""Man pages generated from the parsers and the config schema: complete and clean roff.

The pages are rendered with the real groff/man, which is what lintian checks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestagent.agent import config
from guestagent.cli import build_parser
from guestagent.host.cli import build_parser as build_host_parser

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("groff") is None or shutil.which("man") is None,
                                reason="groff and man are missing (Debian packages groff-base, "
                                       "man-db)")


def load_generator():
    spec = importlib.util.spec_from_file_location("manpages", ROOT / "packaging" / "manpages.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["manpages"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


manpages = load_generator()


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("man")
    assert manpages.main([str(out)]) == 0
    return {p.name: p for p in out.iterdir()}


def as_text(page: Path) -> str:
    """The page as a reader sees it, on one long line width, hyphens as '-'."""
    proc = subprocess.run(["groff", "-man", "-Tascii", "-P-cbou", "-rLL=400n", str(page)],
                          capture_output=True, text=True, check=True, timeout=30)
    return proc.stdout


def subcommands(parser: argparse.ArgumentParser, words=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield words + (name,), sub
                yield from subcommands(sub, words + (name,))


def test_pages_render_without_man_warnings(pages):
    # The same check lintian makes (groff-message, manpage-has-errors-from-man).
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    for page in pages.values():
        proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                               str(page)], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and proc.stderr == "", f"{page.name}: {proc.stderr}"


@pytest.mark.parametrize("name,build", [("guestagent.8", build_parser),
                                        ("guestagent-host.8", build_host_parser)])
def test_command_page_lists_every_subcommand_and_option(pages, name, build):
    text = as_text(pages[name])
    parser = build()
    found = list(subcommands(parser))
    if name == "guestagent.8":
        assert {"tasks", "cloud-init"} <= {words[0] for words, _ in found}
    for words, sub in [((), parser)] + found:
        if words:
            assert f"{parser.prog} {' '.join(words)}" in text, words
        for action in sub._actions:
            for flag in action.option_strings:
                assert re.search(rf"(^|\s){re.escape(flag)}\b", text), (words, flag)


def test_config_page_lists_every_section_and_key(pages):
    text = as_text(pages["guestagent.toml.5"])
    for section in config.sections():
        assert f"SECTION [{section}]" in text
    for key in config.SCHEMA + config.RULE_KEYS:
        entry = re.search(rf"^ +{re.escape(key.name)} \((.*)\)$", text, re.M)
        assert entry, key.name
        assert f"default {config.toml_value(key.default)}" in entry.group(1), key.name
    # Keys appear under their own section: the first key of each section
    # follows that section's heading.
    for section in config.sections():
        first = next(k for k in config.SCHEMA if k.section == section)
        assert text.index(f"SECTION [{section}]") < text.index(f"   {first.name} (")


def test_host_schema_keys_render_as_clean_roff(tmp_path):
    """The host configs use the same KeySpec schema; every kind of key it has renders."""
    from guestagent.host import config as host_config
    from guestagent.host import serviceconfig

    keys = host_config.SCHEMA + serviceconfig.SCHEMA
    page = tmp_path / "host.5"
    page.write_text("\n".join(manpages.page_header("host", 5, "keys", "0", "2026-01-01")
                              + [line for key in keys for line in manpages.key_roff(key)]) + "\n")
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = as_text(page)
    for key in keys:
        assert re.search(rf"^ +{re.escape(key.name)} \(", text, re.M), key.name
    assert "lease_periods (float; above 0, at most 2; default 1.5)" in text
    assert 'rt_policies (list of fifo, rr; default ["fifo", "rr"])' in text
    assert "pin_cpus (list[int]; from 0 to 4095)" in text  # no default: the text says it


def test_page_is_dated_by_source_date_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    manpages.main([str(tmp_path)])
    assert (tmp_path / "guestagent.8").read_text().startswith(
        '.TH "GUESTAGENT" "8" "2023-11-14"')


@settings(max_examples=40, deadline=None)
@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
       .filter(lambda s: not s.isspace()))
def test_escape_keeps_any_word_verbatim(tmp_path_factory, word):
    # Words starting with . or ' would be roff requests, and \ an escape.
    page = tmp_path_factory.mktemp("esc") / "x.1"
    page.write_text('.TH X 1\n.SH NAME\nx\n.SH D\n' + manpages.escape(word) + "\n")
    rendered = as_text(page)
    assert word in rendered.replace("\u2010", "-")
