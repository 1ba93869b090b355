"""`guestagent watch`: the live view of status, hints and capacity.

On a terminal it redraws in place (alternate screen), fitted to the terminal's
size, with the time and what changed since the last refresh; `q` quits. Into a
pipe or file it prints plain blocks, one per refresh, without escapes. When
the agent stops answering (a restart), it says so and waits for it.
The screen is computed by pure functions; the loop does the IO.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from guestagent.display import escape, fit

Docs = Mapping[str, Mapping[str, Any]]  # "status", "hints", "capacity"


def _hint_of(docs: Docs) -> dict[int, str]:
    from guestagent.agent.report import describe_need

    return {h["vcpu"]: describe_need(h) + (f" [{','.join(h['flags'])}]" if h["flags"] else "")
            for h in docs["hints"].get("vcpus", [])}


def _capacity_of(docs: Docs) -> dict[int, int]:
    cap = docs["capacity"]
    return {c["vcpu"]: c["capacity"] for c in cap.get("vcpus", [])} if cap.get("known") else {}


def changes(before: Docs | None, after: Docs) -> list[str]:
    """What differs between two refreshes, one short phrase each, for people."""
    if before is None:
        return []
    out = []
    b_t, a_t = before["status"]["transport"], after["status"]["transport"]
    if before["status"].get("pid") != after["status"].get("pid"):
        out.append(f"agent restarted (pid {after['status'].get('pid')})")
    for key in ("link", "host_state"):
        if b_t.get(key) != a_t.get(key):
            out.append(f"{key.replace('_', ' ')} {b_t.get(key, '-')} -> {a_t.get(key, '-')}")
    b_h, a_h = _hint_of(before), _hint_of(after)
    for vcpu in sorted(set(b_h) | set(a_h)):
        if b_h.get(vcpu) != a_h.get(vcpu):
            out.append(f"vCPU {vcpu} {b_h.get(vcpu, '-')} -> {a_h.get(vcpu, '-')}")
    b_c, a_c = _capacity_of(before), _capacity_of(after)
    if bool(b_c) != bool(a_c):
        out.append("capacity " + ("known" if a_c else "unknown"))
    else:
        out += [f"vCPU {v} capacity {b_c[v]} -> {a_c[v]}"
                for v in sorted(set(b_c) & set(a_c)) if b_c[v] != a_c[v]]
    b_e, a_e = before["status"].get("errors", {}), after["status"].get("errors", {})
    out += [f"{k} errors +{a_e[k] - b_e.get(k, 0)}" for k in sorted(a_e)
            if a_e[k] > b_e.get(k, 0)]
    return out


def screen(docs: Docs, changed: Sequence[str], clock: str, width: int | None = None,
           height: int | None = None) -> str:
    """The whole view as text: a title line (time, what changed), then the status block,
    the hints and the capacity. Fitted to width x height when given: the status block
    comes first so a small terminal keeps it, and the title says how much is cut."""
    from guestagent.agent.report import capacity_table, hints_table
    from guestagent.cli.agent import status_text

    body = "\n\n".join((status_text(docs["status"]), hints_table(docs["hints"]),
                        capacity_table(docs["capacity"]))).split("\n")
    what = "changed: " + "; ".join(changed) if changed else "no change"
    title = f"{clock}  {what}"
    if height is not None and len(body) + 1 > height:
        hidden = len(body) + 1 - height
        title = f"{clock}  [{hidden} lines below; enlarge the terminal]  {what}"
        body = body[:max(0, height - 1)]
    text = escape(title) + "\n" + "\n".join(body)
    return fit(text, width) if width is not None else text


@dataclass
class Terminal:
    """The tty side: alternate screen, cbreak input for `q`, size; restored on close."""

    fd_in: int | None
    saved: Any = None

    def open(self) -> None:
        if self.fd_in is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd_in)
            tty.setcbreak(self.fd_in)
        sys.stdout.write("\x1b[?1049h\x1b[?25l")  # alternate screen, cursor hidden

    def close(self) -> None:
        sys.stdout.write("\x1b[?25h\x1b[?1049l")
        sys.stdout.flush()
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd_in, termios.TCSADRAIN, self.saved)

    @staticmethod
    def size() -> tuple[int, int]:
        size = os.get_terminal_size(sys.stdout.fileno())
        return size.columns, size.lines

    def draw(self, text: str) -> None:
        sys.stdout.write("\x1b[H\x1b[2J" + text)
        sys.stdout.flush()

    def wait_for_quit(self, seconds: float) -> bool:
        """Sleep up to seconds; True when `q` was pressed."""
        if self.fd_in is None:
            time.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd_in], [], [], left)
            if ready:
                key = os.read(self.fd_in, 32)
                if not key or b"q" in key.lower():
                    return True
        return False


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def run_watch(ask: Callable[[str], dict], interval: float, count: int | None,
              as_json: bool) -> int:
    """The loop: refresh every interval until count refreshes were shown or `q`."""
    from guestagent.errors import GuestagentError

    tty = sys.stdout.isatty() and not as_json
    term = Terminal(sys.stdin.fileno() if tty and sys.stdin.isatty() else None)
    previous: Docs | None = None
    waiting_said = False
    shown = 0
    if tty:
        term.open()
    try:
        while count is None or shown < count:
            try:
                docs = {c: {k: v for k, v in ask(c).items() if k != "ok"}
                        for c in ("status", "hints", "capacity")}
            except GuestagentError as err:
                if str(err).startswith("permission denied"):
                    raise
                line = f"{_clock()}  agent not answering ({err}); waiting for it"
                if tty:
                    width, _ = term.size()
                    term.draw(fit(escape(line) + "\n(q quits)", width))
                elif not waiting_said:
                    print(escape(line), file=sys.stderr, flush=True)
                waiting_said = True
            else:
                if waiting_said and not tty:
                    print(f"{_clock()}  agent answering again", file=sys.stderr, flush=True)
                waiting_said = False
                if as_json:
                    print(json.dumps(docs, sort_keys=True), flush=True)
                elif tty:
                    width, height = term.size()
                    term.draw(screen(docs, changes(previous, docs), _clock(), width, height))
                else:
                    sys.stdout.write(("\n" if shown else "")
                                     + screen(docs, changes(previous, docs), _clock()) + "\n")
                    sys.stdout.flush()
                previous = docs
                shown += 1
                if count is not None and shown >= count:
                    break
            if term.wait_for_quit(interval) if tty else _sleep(interval):
                break
    finally:
        if tty:
            term.close()
    return 0


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False
