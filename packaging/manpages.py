"""Generate guestagent(8), guestagent-host(8) and guestagent.toml(5) from the code.

Run at package build time (debian/rules, the rpm spec's %build), so the pages
list exactly the subcommands, options and configuration keys of the build:

    python3 packaging/manpages.py OUTDIR

The pages come from the argparse parsers (every subcommand, nested ones too,
and every option) and from guestagent.agent.config.SCHEMA. SOURCE_DATE_EPOCH, when
set, dates the pages so that builds are reproducible.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

PROJECT = "guestagent"


@dataclass(frozen=True)
class Command:
    """One (sub)command: its words after the program name and its parser."""

    words: tuple[str, ...]
    help: str
    parser: argparse.ArgumentParser


def escape(text: str) -> str:
    """text as roff: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = text.split("\n")
    return "\n".join("\\&" + ln if ln[:1] in (".", "'") else ln for ln in lines)


def walk(parser: argparse.ArgumentParser,
         words: tuple[str, ...] = ()) -> Iterator[Command]:
    """Every subcommand under parser, depth first, in the order they were added."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a subcommand already listed
                continue
            seen.add(id(sub))
            path = words + (name,)
            yield Command(path, helps.get(name, "") or sub.description or "", sub)
            yield from walk(sub, path)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction))
            and a.help != argparse.SUPPRESS]


def expand_help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%" not in text:
        return text
    params = dict(vars(action), prog="")
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    try:
        return text % params
    except (KeyError, TypeError, ValueError):
        return text


def option_label(action: argparse.Action) -> str:
    """How an option is written in the page, e.g. `\\fB\\-\\-config\\fR \\fIPATH\\fR`."""
    if not action.option_strings:
        name = action.metavar or action.dest
        return f"\\fI{escape(str(name))}\\fR"
    takes_value = action.nargs != 0
    if takes_value:
        if action.metavar is not None:
            metavar = action.metavar if isinstance(action.metavar, str) else \
                " ".join(action.metavar)
        elif action.choices is not None:
            metavar = "{" + ",".join(map(str, action.choices)) + "}"
        else:
            metavar = action.dest.upper()
    labels = []
    for flag in action.option_strings:
        label = f"\\fB{escape(flag)}\\fR"
        if takes_value:
            label += f" \\fI{escape(metavar)}\\fR"
        labels.append(label)
    return ", ".join(labels)


def options_roff(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in options(parser):
        out += [".TP", option_label(action), escape(expand_help(action)) or "\\&"]
    return out


def page_header(name: str, section: int, title: str, version: str, date: str) -> list[str]:
    manual = "System Administration" if section == 8 else "File Formats"
    return [
        f'.TH "{name.upper()}" "{section}" "{date}" "{PROJECT} {version}" "{manual}"',
        ".SH NAME",
        f"{escape(name)} \\- {escape(title)}",
    ]


def tagged(heading: str, items: Sequence[tuple[str, str]], font: str = "I") -> list[str]:
    """A section of tagged paragraphs: each tag (a path, a code, a signal) and its meaning."""
    out = [f".SH {heading}"]
    for tag, what in items:
        out += [".TP", f"\\f{font}{escape(tag)}\\fR", escape(what)]
    return out


def command_page(parser: argparse.ArgumentParser, title: str, version: str, date: str,
                 files: Sequence[tuple[str, str]] = (),
                 see_also: Sequence[str] = (),
                 exit_status: Sequence[tuple[str, str]] = (),
                 signals: Sequence[tuple[str, str]] = ()) -> str:
    """A section-8 page for a command line: synopsis, options, every subcommand."""
    prog = parser.prog
    commands = list(walk(parser))
    out = page_header(prog, 8, title, version, date)
    out += [".SH SYNOPSIS", f"\\fB{escape(prog)}\\fR [\\fIOPTIONS\\fR]"
            + (" \\fICOMMAND\\fR [\\fIARGS\\fR]" if commands else "")]
    if parser.description:
        out += [".SH DESCRIPTION", escape(parser.description)]
    out += [".SH OPTIONS", ".TP", "\\fB\\-h\\fR, \\fB\\-\\-help\\fR",
            "Show a summary of the options and exit."]
    out += options_roff(parser)
    if commands:
        out.append(".SH COMMANDS")
        for cmd in commands:
            usage = " ".join(cmd.words)
            out += [f".SS {escape(prog)} {escape(usage)}"]
            description = cmd.parser.description or cmd.help
            if description:
                out.append(escape(description))
            out += options_roff(cmd.parser)
    if exit_status:
        out += tagged("EXIT STATUS", exit_status, "B")
    if signals:
        out += tagged("SIGNALS", signals, "B")
    if files:
        out += tagged("FILES", files)
    if see_also:
        out += [".SH SEE ALSO", ",\n".join(f"\\fB{escape(p.split('(')[0])}\\fR"
                                            f"({p.split('(')[1]}" for p in see_also)]
    return "\n".join(out) + "\n"


def key_roff(key: Any) -> list[str]:
    """One configuration key as a tagged paragraph: name, type, default, limits, meaning."""
    from guestagent.agent.config import toml_value

    facts = [key.type]
    if key.choices:
        facts = [("one of " if key.type == "choice" else "list of ") + ", ".join(key.choices)]
    if key.exclusive_minimum is not None:
        facts.append(f"above {fmt_num(key.exclusive_minimum)}, at most {fmt_num(key.maximum)}")
    elif key.minimum is not None or key.maximum is not None:
        facts.append(f"from {fmt_num(key.minimum)} to {fmt_num(key.maximum)}")
    if key.default is not None:  # None: the description says what stands in for it
        facts.append(f"default {toml_value(key.default)}")
    return [".TP", f"\\fB{escape(key.name)}\\fR ({escape('; '.join(facts))})", escape(key.doc)]


def fmt_num(x: object) -> str:
    if x is None:
        return "any"
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return str(x)


def config_page(version: str, date: str) -> str:
    """guestagent.toml(5): every section and key of the schema, and the rule tables."""
    from guestagent.agent import config

    out = page_header("guestagent.toml", 5, "guestagent configuration file", version, date)
    out += [
        ".SH SYNOPSIS", f"\\fI{escape(config.DEFAULT_PATH)}\\fR",
        ".SH DESCRIPTION",
        escape("The configuration of guestagent(8), in TOML. Every key is optional; a "
               "missing key takes its default. Unknown keys and values of the wrong type "
               "or out of range are errors that name the file and line. The agent "
               "rereads the file on SIGHUP (systemctl reload guestagent)."),
    ]
    for section in config.sections():
        out += [".SH SECTION [" + escape(section) + "]"]
        for key in config.SCHEMA:
            if key.section == section:
                out += key_roff(key)
    out += [".SH RULES [[rule]]",
            escape("Each [[rule]] table marks matching tasks latency-sensitive. A rule "
                   "sets at least one of " + ", ".join(config.RULE_MATCH_KEYS)
                   + "; all that are set must match.")]
    for key in config.RULE_KEYS:
        out += key_roff(key)
    out += [".SH EXAMPLE", ".EX", escape('[policy]\ncritical_irqs = ["nvme0q*"]\n\n'
                                         '[[rule]]\nname = "audio"\n'
                                         'unit = "pipewire*.service"\nsched = "fifo"\n'
                                         'priority = 70'), ".EE",
            ".SH SEE ALSO", "\\fBguestagent\\fR(8)"]
    return "\n".join(out) + "\n"


def build_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = int(epoch) if epoch and epoch.isdigit() else int(time.time())
    return time.strftime("%Y-%m-%d", time.gmtime(when))


EXIT_COMMON = [
    ("0", "Success."),
    ("1", "The command failed: the reason is one line on standard error."),
    ("2", "Bad arguments (or no command given)."),
    ("130", "Interrupted (SIGINT, Ctrl-C)."),
]
DOCS = "/usr/share/doc/{pkg}"


def guest_page(version: str, date: str) -> str:
    from guestagent.cli import build_parser

    docs = DOCS.format(pkg="guestagent")
    return command_page(
        build_parser(), "guest scheduling hints for the hypervisor host", version, date,
        exit_status=EXIT_COMMON,
        signals=[("SIGHUP", "guestagent run rereads its configuration file; a file that "
                  "fails to load is reported and the old configuration stays."),
                 ("SIGTERM, SIGINT", "guestagent run publishes neutral hints, restores the "
                  "affinity of steered tasks and exits 0."),
                 ("q", "guestagent watch on a terminal: the key q quits.")],
        files=[("/etc/guestagent/guestagent.toml", "The configuration file."),
               ("/etc/default/guestagent",
                "GUESTAGENT_ARGS: extra arguments for the service "
                "(/etc/sysconfig/guestagent on rpm systems)."),
               ("/run/guestagent/control.sock",
                "The control socket; members of the guestagent group may read through it."),
               ("/run/guestagent/region",
                "The local region the agent publishes to when the host offers no transport."),
               (f"{docs}/cli-json.md", "The --json output of every command."),
               (f"{docs}/policy.md", "How hints are chosen from the guest's threads and IRQs."),
               (f"{docs}/protocol.md", "The guest-host protocol.")],
        see_also=["guestagent.toml(5)", "guestagent-host(8)", "systemctl(1)"])


def host_page(version: str, date: str) -> str:
    from guestagent.host.cli import build_parser

    docs = DOCS.format(pkg="guestagent-host")
    return command_page(
        build_parser(), "reference host peer for guestagent", version, date,
        exit_status=EXIT_COMMON,
        signals=[("SIGTERM, SIGINT", "Every vCPU thread changed is restored to its recorded "
                  "settings before exit."),
                 ("SIGKILL", "Nothing can run: the state files under /run/guestagent-host "
                  "keep the originals, and guestagent-host restore or the next peer for "
                  "the VM puts them back.")],
        files=[("/etc/guestagent-host/guestagent-host.toml",
                "Host limits (TOML), given with --config."),
               ("/etc/default/guestagent-host",
                "GUESTAGENT_HOST_ARGS: extra arguments for the service "
                "(/etc/sysconfig/guestagent-host on rpm systems)."),
               ("/run/guestagent-host/status.sock", "The status socket guestagent-host "
                "status reads."),
               ("/run/guestagent-host/", "State files: the originals of changed threads."),
               (f"{docs}/host.md", "What the host peer applies, and its limits."),
               (f"{docs}/cli-json.md", "The status --json document."),
               (f"{docs}/protocol.md", "The guest-host protocol.")],
        see_also=["guestagent(8)", "chrt(1)"])


# File name -> (package, page), for every page the packages ship.
PAGES = {
    "guestagent.8": ("guestagent", guest_page),
    "guestagent.toml.5": ("guestagent", config_page),
    "guestagent-host.8": ("guestagent-host", host_page),
}


def render_all() -> dict[str, str]:
    """File name -> page text for every page the packages ship."""
    from guestagent import __version__

    date = build_date()
    return {name: render(__version__, date) for name, (_, render) in PAGES.items()}


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: manpages.py OUTDIR", file=sys.stderr)
        return 2
    outdir = argv[0]
    os.makedirs(outdir, exist_ok=True)
    for name, text in render_all().items():
        with open(os.path.join(outdir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
