"""The TOML schema machinery both configs use: one wording, lines from the document."""

from __future__ import annotations

import math

import pytest

from guestagent.errors import ConfigError
from guestagent.linux.schema import KeyLines, KeySpec, check_table, check_value, parse_document


def spec(kind: str, **kw) -> KeySpec:
    return KeySpec(kw.pop("section", "s"), "k", kind, None, "", **kw)


@pytest.mark.parametrize("key,value,message", [
    (spec("float", minimum=0, maximum=1), math.nan, "s.k must be at least 0"),
    (spec("float", maximum=2, exclusive_minimum=0), 0.0, "s.k must be more than 0"),
    (spec("int", section=""), 1.5, "k must be an integer"),
    (spec("path", nonempty=True), "", "s.k must be an absolute path"),
    (spec("path"), "rel", 's.k must be an absolute path or ""'),
    (spec("list[str]", nonempty=True), ["a", ""], "s.k must be a list of non-empty strings"),
    (spec("list[int]", minimum=0, maximum=3), [1, True], "s.k must be a list of integers "
                                                           "from 0 to 3"),
    (spec("list[choice]", choices=("a", "b")), ["c"], "s.k must be a list, each one of a, b"),
    (spec("table[int]", minimum=0, maximum=9), {"2": 10}, "s.k.2 must be an integer from 0 to 9"),
    (spec("table[int]"), {"-1": 1}, "s.k keys must be whole numbers, not '-1'"),
    (spec("table[int]"), [], "s.k must be a table of integers keyed by whole numbers"),
])
def test_bad_values_say_what_the_key_must_be(key, value, message):
    with pytest.raises(ConfigError) as err:
        check_value(key, value, "f.toml:3")
    assert str(err.value) == f"f.toml:3: {message}"


def test_good_values_come_back_in_their_python_form():
    assert check_value(spec("float", exclusive_minimum=0), 2, "w") == 2.0
    assert check_value(spec("path"), "", "w") == ""
    assert check_value(spec("table[int]"), {"0": 5, "12": 0}, "w") == {0: 5, 12: 0}
    assert check_value(spec("list[choice]", choices=("a",)), ["a", "a"], "w") == ["a", "a"]


def test_table_lines_come_from_the_document():
    text = "top = 1\n\n[s]\n\nk = 'x'\n[contend]\n1 = 2\n"
    lines, doc = KeyLines(text), parse_document(text, "f.toml")
    with pytest.raises(ConfigError, match=r"^f\.toml:5: s\.k must be an integer$"):
        check_table([spec("int")], "s", doc["s"], "f.toml", lines)
    with pytest.raises(ConfigError, match=r"^f\.toml:6: unknown key contend$"):
        check_table([KeySpec("", "top", "int", 0, "")], "",
                    {"top": 1, "contend": doc["contend"]}, "f.toml", lines)
    with pytest.raises(ConfigError, match=r"^f\.toml:1: top must be a table$"):
        check_table([], "top", doc["top"], "f.toml", lines)


@pytest.mark.parametrize("text,line", [("a = [\n", 1), ("a = 1\nb = = 2\n", 2),
                                       ("a = [1,\n 2]\nb = {\n", 3)])
def test_syntax_errors_name_the_line_whatever_the_parser(text, line):
    with pytest.raises(ConfigError) as err:
        parse_document(text, "f.toml")
    assert str(err.value).startswith(f"f.toml:{line}: ") and "(at line" not in str(err.value)
