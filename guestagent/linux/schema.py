"""Declarative TOML configuration: key specs, strict value checks, lines for errors.

A config module lists its keys as ``KeySpec`` values; ``check_value`` holds a
raw TOML value to its spec, ``KeyLines`` finds where a key sits in the text,
and ``syntax_error_line`` finds where a document stops being TOML. Lines come
from the document itself, never from the parser's error attributes, so
tomllib (3.11+) and tomli (3.9, 3.10) report the same ``file:line``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from guestagent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

__all__ = ["KeyLines", "KeySpec", "check_value", "syntax_error_line", "tomllib"]


@dataclass(frozen=True)
class KeySpec:
    """One configuration key: where it lives, what it holds, what it means."""

    section: str
    name: str
    type: str  # "int" | "float" | "bool" | "str" | "list[str]" | "choice"
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()


def check_value(spec: KeySpec, value: Any, where: str) -> Any:
    """Return the value if it fits the spec, else raise ConfigError naming `where`."""
    label = f"{spec.section}.{spec.name}"
    if spec.type == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {label} must be true or false")
        return value
    if spec.type in ("int", "float"):
        numeric = (int,) if spec.type == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            kind = "an integer" if spec.type == "int" else "a number"
            raise ConfigError(f"{where}: {label} must be {kind}")
        if spec.minimum is not None and value < spec.minimum:
            raise ConfigError(f"{where}: {label} must be at least {_num(spec.minimum)}")
        if spec.maximum is not None and value > spec.maximum:
            raise ConfigError(f"{where}: {label} must be at most {_num(spec.maximum)}")
        return float(value) if spec.type == "float" else value
    if spec.type == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {label} must be a string")
        return value
    if spec.type == "choice":
        if value not in spec.choices:
            raise ConfigError(f"{where}: {label} must be one of {', '.join(spec.choices)}")
        return value
    if spec.type == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {label} must be a list of strings")
        return list(value)
    raise AssertionError(f"unknown key type {spec.type}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


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
