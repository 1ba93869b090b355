"""Text for people: escaping, aligned tables and flag names, shared by every view.

Thread names, rule names, reasons, paths and anything a guest sends are
untrusted: any user can name a thread "\\x1b[2J". Every human view of both
commands passes its text through ``escape`` (``table`` does it for each cell),
so no control character reaches a terminal and a tab or newline cannot split
a row. JSON output is never escaped this way: it carries the exact strings.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence


def _is_control(code: int) -> bool:
    """C0 controls, DEL and C1 controls (what a terminal may act on)."""
    return code < 0x20 or 0x7F <= code <= 0x9F


def escape(text: object) -> str:
    """str(text) with every C0 and C1 control character and DEL written as \\xHH, and other
    unprintable characters (bidirectional overrides, line separators) as \\uHHHH.

    Invalid UTF-8 in a thread name already reads \\xHH (observe decodes comm with
    backslashreplace), so both look alike; backslashes themselves are left as they are.
    """
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for c in s:
        code = ord(c)
        if _is_control(code):
            out.append(f"\\x{code:02x}")
        elif c.isprintable():
            out.append(c)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def table(headers: Sequence[object] | None, rows: Iterable[Sequence[object]],
          right: Iterable[int] = ()) -> str:
    """Columns two spaces apart, every cell escaped; the last column (free text) is
    not padded. Columns whose index is in ``right`` are right-aligned (numbers).
    Without headers, only the rows are printed (a key/value block)."""
    cells = [[escape(c) for c in r] for r in rows]
    if headers is not None:
        cells.insert(0, [escape(c) for c in headers])
    if not cells:
        return ""
    ncols = max(len(r) for r in cells)
    widths = [max((len(r[i]) for r in cells if i < len(r)), default=0) for i in range(ncols)]
    aligned = set(right)
    lines = []
    for r in cells:
        parts = []
        for i, c in enumerate(r):
            if i == len(r) - 1 and i not in aligned:
                parts.append(c)
            elif i in aligned:
                parts.append(c.rjust(widths[i]))
            else:
                parts.append(c.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def flag_names(flags: int, kind: type[enum.Flag]) -> list[str]:
    """The lower-case names of the single-bit members of kind set in flags, in bit order
    (so composite or zero members such as NONE never appear)."""
    value = int(flags)
    return [m.name.lower() for m in kind
            if m.name and m.value and m.value & (m.value - 1) == 0 and value & m.value]


def fit(text: str, width: int, height: int | None = None) -> str:
    """text cut to width columns (a cut line ends in '>') and to height lines, for a
    terminal that must not wrap or scroll."""
    lines = text.split("\n")
    if height is not None and len(lines) > height:
        hidden = len(lines) - height + 1
        lines = lines[:height - 1] + [f"... {hidden} more lines (enlarge the terminal)"]
    if width > 1:
        lines = [ln if len(ln) <= width else ln[:width - 1] + ">" for ln in lines]
    return "\n".join(lines)
