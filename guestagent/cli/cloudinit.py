"""`guestagent cloud-init`: user-data that reproduces this guest's setup elsewhere.

The output is #cloud-config YAML for pasting into a cloud console: install the
package (unless the image already has it), put the current configuration file
in place once the package is there, then enable and (re)start the unit. It is
built as text, since PyYAML is not a runtime dependency; the config file is
embedded verbatim so its comments survive.

write_files stages the file under /run, and runcmd moves it to the package's
conffile only if the package is installed. Written there directly, a failed
install would leave a file at the conffile path that no package owns, and a
later `apt-get install` would stop at dpkg's conffile prompt.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

PACKAGE = "guestagent"
UNIT = "guestagent.service"
CONFIG_PATH = "/etc/guestagent/guestagent.toml"
STAGED_PATH = "/run/guestagent-cloud-init.toml"


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
    repo = parser.add_mutually_exclusive_group()
    repo.add_argument("--apt-source", metavar="LINE",
                      help="add this apt source before installing, for example "
                           "\"deb https://pkgs.example.org/debian stable main\"")
    repo.add_argument("--yum-baseurl", metavar="URL",
                      help="add a yum/dnf repository with this baseurl before installing")
    parser.add_argument("--repo-key", metavar="FILE|URL",
                        help="the repository's signing key: an ASCII-armored key FILE "
                             "(apt, embedded) or the key's URL (yum gpgkey)")
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class PackageSource:
    """Where the guest finds the package: an apt source line or a yum baseurl."""

    apt_source: str = ""
    apt_key: str = ""  # ASCII-armored key text
    yum_baseurl: str = ""
    yum_gpgkey: str = ""  # URL


def package_source(args: argparse.Namespace) -> PackageSource | None:
    from guestagent.errors import GuestagentError

    if args.installed and (args.apt_source or args.yum_baseurl):
        raise GuestagentError("--installed installs nothing: a package source makes no sense")
    for value in (args.apt_source, args.yum_baseurl, args.repo_key):
        if value and not value.isprintable():
            raise GuestagentError(f"{one_line(value)!r}: one printable line expected")
    if args.apt_source:
        if not args.apt_source.startswith(("deb ", "deb [")):
            raise GuestagentError(f"--apt-source {args.apt_source!r}: expected a sources.list "
                                  "line, \"deb URL SUITE COMPONENT\"")
        key = ""
        if args.repo_key:
            with open(args.repo_key, encoding="ascii") as f:
                key = f.read()
            if "BEGIN PGP PUBLIC KEY BLOCK" not in key:
                raise GuestagentError(f"--repo-key {args.repo_key}: not an ASCII-armored key")
        return PackageSource(apt_source=args.apt_source, apt_key=key)
    if args.yum_baseurl:
        if not args.yum_baseurl.startswith(("https://", "http://", "file://")):
            raise GuestagentError(f"--yum-baseurl {args.yum_baseurl!r}: expected a URL")
        return PackageSource(yum_baseurl=args.yum_baseurl, yum_gpgkey=args.repo_key or "")
    if args.repo_key:
        raise GuestagentError("--repo-key needs --apt-source or --yum-baseurl")
    return None


def run(args: argparse.Namespace) -> int:
    from guestagent.agent.config import DEFAULT_PATH

    path = args.config or DEFAULT_PATH
    text = read_config_text(path, missing_ok=args.config is None)
    if args.config is None and not os.path.lexists(path):
        source = f"the built-in defaults ({path} does not exist here)"
    else:
        source = path
    print(user_data(text, source=source, install=not args.installed,
                    repo=package_source(args)), end="")
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


def repo_lines(repo: PackageSource) -> list[str]:
    """cloud-config that adds the package source (cloud-init's apt and yum_repos modules)."""
    if repo.apt_source:
        lines = ["# The package source (cloud-init's apt module writes it before installing).",
                 "apt:", "  sources:", "    guestagent.list:",
                 "      source: " + yaml_quoted(repo.apt_source)]
        if repo.apt_key:
            lines.append("      key: " + yaml_text(repo.apt_key, indent=8))
        return lines
    lines = ["# The package source (cloud-init's yum_repos module writes it before installing).",
             "yum_repos:", "  guestagent:", "    name: guestagent",
             "    baseurl: " + yaml_quoted(repo.yum_baseurl), "    enabled: true",
             f"    gpgcheck: {'true' if repo.yum_gpgkey else 'false'}"]
    if repo.yum_gpgkey:
        lines.append("    gpgkey: " + yaml_quoted(repo.yum_gpgkey))
    return lines


def user_data(config_text: str, source: str, install: bool = True,
              config_path: str = CONFIG_PATH,
              repo: PackageSource | None = None) -> str:
    """#cloud-config user-data embedding config_text as the guest's config file."""
    lines = [
        "#cloud-config",
        f"# guestagent: configuration from {one_line(source)}.",
    ]
    if install and repo is not None:
        lines += repo_lines(repo)
    if install:
        lines += [
            "# Installs the package, then puts the configuration in place if the",
            "# package is there (a failed install leaves its conffile path alone),",
            "# then enables and restarts the unit.",
            "package_update: true",
            "packages:",
            f"  - {PACKAGE}",
        ]
    else:
        lines += [
            "# For images that already contain the package: puts the configuration",
            "# in place, then enables and restarts the unit so that it reads it.",
        ]
    lines += [
        "write_files:",
        f"  - path: {STAGED_PATH}",
        "    owner: root:root",
        "    permissions: '0644'",
        "    content: " + yaml_text(config_text, indent=6),
        "runcmd:",
        "  - - sh",
        "    - -ec",
        "    - " + yaml_text(install_script(config_path), indent=6),
    ]
    return "\n".join(lines) + "\n"


def install_script(config_path: str) -> str:
    """runcmd's shell script: the staged config to its place, then the unit."""
    return (f"if ! command -v {PACKAGE} >/dev/null; then\n"
            f"  echo \"{PACKAGE} is not installed: {config_path} not written\" >&2\n"
            "  exit 1\n"
            "fi\n"
            f"install -m 0644 {STAGED_PATH} {config_path}\n"
            f"rm -f {STAGED_PATH}\n"
            f"systemctl enable {UNIT}\n"
            f"systemctl restart {UNIT}\n")


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
