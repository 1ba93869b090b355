"""`guestagent cloud-init`: user-data that reproduces this guest's setup elsewhere.

The output is #cloud-config YAML for pasting into a cloud console: install the
package (unless the image already has it), write the current configuration file
once the package is in place, then enable and (re)start the unit. It is built
as text, since PyYAML is not a runtime dependency; the config file is embedded
verbatim so its comments survive.
"""

from __future__ import annotations

import argparse
import os

PACKAGE = "guestagent"
UNIT = "guestagent.service"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cloud-init",
        help="print cloud-init user-data that sets up guestagent with the current config",
        description="Print #cloud-config user-data that installs guestagent, writes the "
                    "current configuration file and enables the unit.",
    )
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="configuration file to embed (default: "
                             "/etc/guestagent/guestagent.toml; the defaults if it is absent)")
    parser.add_argument("--installed", action="store_true",
                        help="for images that already contain the package: do not install it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guestagent.agent.config import DEFAULT_PATH

    path = args.config or DEFAULT_PATH
    text = read_config_text(path, missing_ok=args.config is None)
    print(user_data(text, source=path, install=not args.installed), end="")
    return 0


def read_config_text(path: str, missing_ok: bool) -> str:
    """The config file's text, checked to be a valid configuration.

    An absent default file means the agent runs on defaults, so the shipped
    commented default file stands in for it.
    """
    from guestagent.agent.config import load_config, render_default_toml

    if missing_ok and not os.path.lexists(path):
        return render_default_toml()
    load_config(path)  # one-line ConfigError for unreadable or invalid files
    with open(path, encoding="utf-8") as f:
        return f.read()


def user_data(config_text: str, source: str, install: bool = True,
              config_path: str = "/etc/guestagent/guestagent.toml") -> str:
    """#cloud-config user-data embedding config_text as the guest's config file."""
    lines = [
        "#cloud-config",
        f"# guestagent: configuration from {one_line(source)}.",
    ]
    if install:
        lines += [
            "# Installs the package, then writes the configuration once the package's",
            "# own default is in place (defer), then enables and restarts the unit.",
            "package_update: true",
            "packages:",
            f"  - {PACKAGE}",
        ]
    else:
        lines += [
            "# For images that already contain the package: writes the configuration,",
            "# then enables and restarts the unit so that it reads it.",
        ]
    lines += [
        "write_files:",
        f"  - path: {config_path}",
        "    owner: root:root",
        "    permissions: '0644'",
        "    defer: true",
        "    content: " + yaml_text(config_text, indent=6),
        "runcmd:",
        f"  - [systemctl, enable, {UNIT}]",
        f"  - [systemctl, restart, {UNIT}]",
    ]
    return "\n".join(lines) + "\n"


def one_line(text: str) -> str:
    """text made safe for a YAML comment line."""
    return "".join(c if c.isprintable() else "?" for c in text)


def yaml_text(text: str, indent: int) -> str:
    """A YAML scalar for text: a literal block when that round-trips, else a quoted string.

    A literal block cannot hold non-printable characters or carriage returns,
    and lines of only blanks, or trailing blanks, do not survive being pasted;
    such texts become a double-quoted scalar with escapes.
    """
    if not block_safe(text):
        return yaml_quoted(text)
    body = text[:-1] if text.endswith("\n") else text
    if text.endswith("\n\n"):
        chomp = "+"
    elif text.endswith("\n"):
        chomp = ""
    else:
        chomp = "-"
    # The explicit indentation indicator (relative to the list item's keys, two
    # columns less) lets the first line start with a blank.
    header = f"|2{chomp}"
    pad = " " * indent
    return header + "".join("\n" + (pad + line if line else "") for line in body.split("\n"))


def block_safe(text: str) -> bool:
    if text.strip("\n") == "" or "\r" in text:
        return False
    for line in text.split("\n"):
        if line != line.rstrip(" \t") or not all(c.isprintable() or c == "\t" for c in line):
            return False
    return True


def yaml_quoted(text: str) -> str:
    """text as a YAML double-quoted scalar; escapes keep it on one printable line."""
    out = []
    for c in text:
        code = ord(c)
        if c in "\"\\":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c.isprintable() and not 0xD800 <= code <= 0xDFFF:
            out.append(c)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'
