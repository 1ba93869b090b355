"""Declarative TOML configuration: key specs, strict value checks, lines for errors.

A config module lists its keys as ``KeySpec`` values. ``parse_document`` reads
the TOML, ``check_table`` holds each key of a table to its spec (``check_value``
holds one value), ``KeyLines`` finds where a key sits in the text, and
``syntax_error_line`` finds where a document stops being TOML. Every error is
one line, ``file:line: what``. Lines come from the document itself, never from
the parser's error attributes, so tomllib (3.11+) and tomli (3.9, 3.10) report
the same ``file:line``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from guestagent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

__all__ = ["KeyLines", "KeySpec", "check_table", "check_value", "label", "parse_document",
           "read_text", "syntax_error_line", "tomllib"]


@dataclass(frozen=True)
class KeySpec:
    """One configuration key: where it lives, what it holds, what it means."""

    section: str  # "" for a key at the top of the document
    name: str
    # "int" | "float" | "bool" | "str" | "path" (absolute) | "choice" | "list[str]" |
    # "list[int]" | "list[choice]" | "table[int]" (whole-number keys, integer values)
    type: str
    default: Any  # None: no TOML value; the doc says what takes its place
    doc: str
    minimum: float | None = None  # bounds hold for numbers and for the items of lists/tables
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    exclusive_minimum: float | None = None  # the value must be above this
    nonempty: bool = False  # "str", "path", "list[str]": "" is refused (else "" means off)


def label(section: str, name: str) -> str:
    """How errors name a key: section.name, or name alone at the top of the document."""
    return f"{section}.{name}" if section else name


def check_value(spec: KeySpec, value: Any, where: str) -> Any:
    """Return the value if it fits the spec, else raise ConfigError naming `where`.

    Lists come back as lists, "table[int]" as a dict keyed by int, "float" as float."""
    name = label(spec.section, spec.name)

    def fail(what: str) -> ConfigError:
        return ConfigError(f"{where}: {name} must be {what}")

    kind = spec.type
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if kind in ("int", "float"):
        if not _is_number(value, kind):
            raise fail("an integer" if kind == "int" else "a number")
        broken = _out_of_bounds(spec, value)
        if broken:
            raise fail(broken)
        return float(value) if kind == "float" else value
    if kind == "str":
        if not isinstance(value, str) or (spec.nonempty and not value):
            raise fail("a non-empty string" if spec.nonempty else "a string")
        return value
    if kind == "path":
        if not isinstance(value, str) or not _is_path(spec, value):
            raise fail(_PATH[spec.nonempty])
        return value
    if kind == "choice":
        if value not in spec.choices:
            raise fail(f"one of {', '.join(spec.choices)}")
        return value
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) and (v or not spec.nonempty)
                                                  for v in value):
            raise fail("a list of non-empty strings" if spec.nonempty else "a list of strings")
        return list(value)
    if kind == "list[choice]":
        if not isinstance(value, list) or any(v not in spec.choices for v in value):
            raise fail(f"a list, each one of {', '.join(spec.choices)}")
        return list(value)
    if kind == "list[int]":
        if not isinstance(value, list) or any(not _is_number(v, "int") or _out_of_bounds(spec, v)
                                              for v in value):
            raise fail("a list of integers" + _bounds(spec))
        return list(value)
    if kind == "table[int]":
        if not isinstance(value, dict):
            raise fail("a table of integers" + _bounds(spec) + " keyed by whole numbers")
        for key, item in value.items():
            if not key.isdecimal():
                raise ConfigError(f"{where}: {name} keys must be whole numbers, not {key!r}")
            if not _is_number(item, "int") or _out_of_bounds(spec, item):
                raise ConfigError(f"{where}: {name}.{key} must be an integer{_bounds(spec)}")
        return {int(key): item for key, item in value.items()}
    raise AssertionError(f"unknown key type {kind}")


_PATH = {False: 'an absolute path or ""', True: "an absolute path"}


def _is_path(spec: KeySpec, value: str) -> bool:
    return value.startswith("/") or (value == "" and not spec.nonempty)


def _is_number(value: Any, kind: str) -> bool:
    numeric = (int,) if kind == "int" else (int, float)
    return isinstance(value, numeric) and not isinstance(value, bool)


def _out_of_bounds(spec: KeySpec, value: float) -> str:
    """What the value breaks, or "". Written so that NaN breaks every bound."""
    if spec.exclusive_minimum is not None and not value > spec.exclusive_minimum:
        return f"more than {_num(spec.exclusive_minimum)}"
    if spec.minimum is not None and not value >= spec.minimum:
        return f"at least {_num(spec.minimum)}"
    if spec.maximum is not None and not value <= spec.maximum:
        return f"at most {_num(spec.maximum)}"
    return ""


def _bounds(spec: KeySpec) -> str:
    """ " from 0 to 4095", for messages about lists and tables of numbers."""
    if spec.minimum is None or spec.maximum is None:
        return ""
    return f" from {_num(spec.minimum)} to {_num(spec.maximum)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_table(specs: Iterable[KeySpec], section: str, table: Any, path: str,
                lines: KeyLines) -> dict[str, Any]:
    """Every key of one TOML table held to its spec: name -> value. `section` is the
    table's name ("" for the top of the document); a key with no spec is an error."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}:{lines.table(section)}: {section} must be a table")
    known = {spec.name: spec for spec in specs if spec.section == section}
    values = {}
    for name, value in table.items():
        line = lines.key(section, name) if section else lines.table(name)
        spec = known.get(name)
        if spec is None:
            raise ConfigError(f"{path}:{line}: unknown key {label(section, name)}")
        values[name] = check_value(spec, value, f"{path}:{line}")
    return values


def parse_document(text: str, path: str) -> dict[str, Any]:
    """The TOML document in `text`; ConfigError `path:line: what` if it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        what = str(err).split(" (at ")[0]  # the parser's own position may differ by version
        raise ConfigError(f"{path}:{syntax_error_line(text)}: {what}") from None


def read_text(path: str) -> str:
    """A config file's text; ConfigError (one line) if it cannot be read as UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


class KeyLines:
    """Finds the line of a key in TOML text, for error messages.

    tomllib gives values without positions; this scans the text once for table
    headers and `key =` lines. It handles the plain layout a config file has
    (headers, [[rule]] arrays, one key per line); for anything else the line of
    the enclosing table is the answer.
    """

    def __init__(self, text: str) -> None:
        self.keys: dict[tuple[Any, str], int] = {}
        self.tables: dict[Any, int] = {}
        table: Any = ""
        counts: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith("[["):
                name = stripped[2:].split("]]", 1)[0].strip()
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = (name, index)
                self.tables.setdefault(table, number)
            elif stripped.startswith("["):
                table = stripped[1:].split("]", 1)[0].strip()
                self.tables.setdefault(table, number)
            elif "=" in stripped and not stripped.startswith("#"):
                key = stripped.split("=", 1)[0].strip().strip("\"'")
                self.keys.setdefault((table, key), number)

    def key(self, table: Any, key: str) -> int:
        return self.keys.get((table, key)) or self.tables.get(table, 1)

    def table(self, name: str) -> int:
        return self.tables.get(name) or self.keys.get(("", name), 1)

    def array_table(self, name: str, index: int) -> int:
        return self.tables.get((name, index), 1)


def syntax_error_line(text: str) -> int:
    """The line at which `text` stops parsing as TOML: one past the longest valid prefix.

    A value may span lines (arrays, multi-line strings), so a prefix that fails
    can be followed by longer ones that parse: the answer is after the last good one.
    """
    lines = text.splitlines(keepends=True)
    for count in range(len(lines), -1, -1):
        try:
            tomllib.loads("".join(lines[:count]))
        except tomllib.TOMLDecodeError:
            continue
        return min(count + 1, max(len(lines), 1))
    return 1
