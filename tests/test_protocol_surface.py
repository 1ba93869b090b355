"""The protocol package's public surface: __all__ is whole, nobody reaches past it."""

from __future__ import annotations

import ast
from pathlib import Path

import guestagent.protocol as protocol

ROOT = Path(__file__).resolve().parent.parent


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_all_names_exist_and_are_public():
    assert protocol.__all__ and len(set(protocol.__all__)) == len(protocol.__all__)
    for name in protocol.__all__:
        assert not name.startswith("_") and hasattr(protocol, name), name


def test_nothing_outside_the_package_imports_its_private_names():
    offenders = []
    for path in [*ROOT.glob("guestagent/**/*.py"), *ROOT.glob("tests/**/*.py"),
                 *ROOT.glob("bench/**/*.py"), *ROOT.glob("testbed/**/*.py")]:
        if "guestagent/protocol" in path.as_posix():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "guestagent.protocol"):
                offenders += [f"{path.relative_to(ROOT)}: {alias.name}"
                              for alias in node.names if private(alias.name)]
            elif isinstance(node, ast.Attribute) and private(node.attr) and \
                    isinstance(node.value, ast.Name) and node.value.id == "protocol":
                offenders.append(f"{path.relative_to(ROOT)}: protocol.{node.attr}")
    assert offenders == []
