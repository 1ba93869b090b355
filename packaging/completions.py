"""Generate bash completion for guestagent and guestagent-host from their parsers.

Run at package build time beside manpages.py, so completion offers exactly the
subcommands and options of the build:

    python3 packaging/completions.py OUTDIR     # writes OUTDIR/guestagent, OUTDIR/guestagent-host

Each script maps a subcommand path ("config check") to its words; options whose
value is a file, socket or directory complete file names, options with choices
complete those.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from manpages import options, walk

PATH_METAVARS = ("FILE", "PATH", "SOCK", "SOCKET", "DIR")


def words_of(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, str]]:
    """Subcommand names and option strings; option -> 'file', 'dir' or 'choice:a b c'."""
    words: list[str] = []
    values: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            words += list(action.choices)
    for action in options(parser):
        words += action.option_strings
        if action.nargs == 0 or not action.option_strings:
            continue
        kind = "value"  # a number or a name: nothing to offer
        if action.choices is not None:
            kind = "choice:" + " ".join(map(str, action.choices))
        elif str(action.metavar or "").upper() in PATH_METAVARS:
            kind = "dir" if str(action.metavar).upper() == "DIR" else "file"
        for flag in action.option_strings:
            values[flag] = kind
    words += ["-h", "--help"]
    positional_file = any(not a.option_strings and str(a.metavar or "").upper() in
                          PATH_METAVARS for a in parser._actions)
    if positional_file:
        values[""] = "file"
    return words, values


def script(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    fn = "_" + prog.replace("-", "_")
    commands = [((), parser)] + [(c.words, c.parser) for c in walk(parser)]
    word_cases, value_cases, subs = [], [], []
    for path, p in commands:
        key = " ".join(path)
        words, values = words_of(p)
        word_cases.append(f'        "{key}") words="{" ".join(words)}" ;;')
        for flag, kind in values.items():
            if flag:
                value_cases.append(f'        "{key}|{flag}") kind="{kind}" ;;')
        if "" in values:
            value_cases.append(f'        "{key}|") positional=file ;;')
        subs += [w for w in words if not w.startswith("-")]
    return f"""# bash completion for {prog}; generated from its argument parser
# by packaging/completions.py at build time.
{fn}() {{
    local cur prev path="" kind="" positional="" words="" i w
    COMPREPLY=()
    cur=${{COMP_WORDS[COMP_CWORD]}}
    prev=${{COMP_WORDS[COMP_CWORD-1]}}
    # The subcommand path so far: the words that name subcommands, in order.
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${{COMP_WORDS[i]}}
        case " {" ".join(sorted(set(subs)))} " in
            *" $w "*) path="${{path:+$path }}$w" ;;
        esac
    done
    case "$path|$prev" in
{chr(10).join(value_cases)}
    esac
    case $kind in
        file) COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null; return ;;
        dir) COMPREPLY=($(compgen -d -- "$cur")); compopt -o filenames 2>/dev/null; return ;;
        choice:*) COMPREPLY=($(compgen -W "${{kind#choice:}}" -- "$cur")); return ;;
        "") ;;
        *) return ;;
    esac
    case "$path" in
{chr(10).join(word_cases)}
    esac
    case "$path|" in
{chr(10).join(value_cases)}
    esac
    if [[ $positional == file && $cur != -* ]]; then
        COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null; return
    fi
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F {fn} {prog}
"""


def render_all() -> dict[str, str]:
    from guestagent.cli import build_parser
    from guestagent.host.cli import build_parser as build_host_parser

    return {"guestagent": script(build_parser()),
            "guestagent-host": script(build_host_parser())}


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: completions.py OUTDIR", file=sys.stderr)
        return 2
    os.makedirs(argv[0], exist_ok=True)
    for name, text in render_all().items():
        with open(os.path.join(argv[0], name), "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
