"""The agent's commands: run (the daemon), status, hints, capacity, watch, config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from guestagent.agent.config import DEFAULT_PATH, default_config, load_config, render_config
from guestagent.cli.args import positive_int, seconds
from guestagent.errors import GuestagentError

SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                   logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """'<priority>message': journald reads the level from the prefix."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>{record.getMessage()}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("guestagent: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _config(args: argparse.Namespace):
    """The config named on the command line, or the default file, or the defaults."""
    if args.config:
        return load_config(args.config), args.config
    return load_config(DEFAULT_PATH, missing_ok=True), (
        DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None)


def cmd_run(args: argparse.Namespace) -> int:
    from guestagent.agent.daemon import Agent

    config, path = _config(args)
    setup_logging(args.log_level or config.agent["log_level"])
    return Agent(config, path).run()


def _socket(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    try:
        config, _ = _config(args)
    except GuestagentError:
        config = default_config()
    return config.control["socket"]


def _ask(args: argparse.Namespace, cmd: str) -> dict:
    from guestagent.agent.control import call

    return call(_socket(args), cmd)


def _print(data: dict, as_json: bool, render) -> None:
    if as_json:
        data = {k: v for k, v in data.items() if k != "ok"}
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(render(data))


def status_text(data: dict) -> str:
    from guestagent.display import escape, table

    t = data["transport"]
    heard = t.get("host_heard_s")
    rows = [
        ("agent", f"guestagent {data['version']}, pid {data['pid']}, up {data['uptime_s']:.0f} s"),
        ("config", data["config"] or "built-in defaults"),
        ("transport", f"{t['kind'] or 'none'} {t['target'] or ''}".strip()),
        ("link", t["link"] + (f" ({t['reason']})" if t.get("reason") else "")),
        ("host", f"{t.get('host_state', 'unknown')}"
         + (f", heard {heard:.1f} s ago"
            if heard is not None and t.get("host_state") != "absent" else "")),
        ("hints", f"generation {data['generation']}, acked "
         f"{t.get('acked_generation', 0)}, {data['nr_vcpus']} vCPUs"),
        ("threads", f"{data['threads']} known, {data['threads_of_note']} of note, "
         f"via {data['thread_events']}"),
        ("sweeps", f"{data['sweeps']}, last {data['sweep_ms']:.2f} ms, every "
         f"{data['sweep_interval_ms']:.0f} ms"),
        ("changes", (f"scheduler wake-ups on, {data['refreshes']} refreshes"
                     if data["sched_events"] else "scheduler wake-ups off: sweeps only")),
        ("steered", str(data["steered_tasks"])),
        ("errors", ", ".join(f"{k} {v}" for k, v in sorted(data["errors"].items())) or "none"),
    ]
    text = table(None, rows)
    if data["notes"]:
        text += "\nnotes:\n" + "\n".join(f"  {escape(n)}" for n in data["notes"])
    return text


def cmd_status(args: argparse.Namespace) -> int:
    _print(_ask(args, "status"), args.json, status_text)
    return 0


def hints_once(config) -> dict:
    """Hints computed from the live system, for when no agent runs."""
    from guestagent.agent.daemon import interest_for
    from guestagent.agent.policy import PolicyState, decide
    from guestagent.agent.report import hints_json
    from guestagent.observe import Observer

    with Observer(interest=interest_for(config), watch=False) as observer:
        observer.snapshot(time.monotonic())
        time.sleep(0.25)  # a second sweep gives CPU usage and IRQ rates
        now = time.monotonic()
        snapshot = observer.snapshot(now)
    decision, _ = decide(snapshot, config, PolicyState(), now)
    return hints_json(decision, 0, now)


def cmd_hints(args: argparse.Namespace) -> int:
    from guestagent.agent.report import hints_table

    try:
        data = _ask(args, "hints")
    except GuestagentError as err:
        if "no agent running" not in str(err):
            raise
        config, _ = _config(args)
        print("guestagent: no agent running: hints computed once from the live system",
              file=sys.stderr)
        data = hints_once(config)
    _print(data, args.json, hints_table)
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    from guestagent.agent.report import capacity_table

    _print(_ask(args, "capacity"), args.json, capacity_table)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from guestagent.cli.watch import run_watch

    return run_watch(lambda cmd: _ask(args, cmd), args.interval, args.count, args.json)


def cmd_reload(args: argparse.Namespace) -> int:
    _ask(args, "reload")
    print("config reloaded")
    return 0


def config_warnings(config) -> list[str]:
    """Settings that validate but do nothing: said by `config check`, not errors."""
    out = []
    for rule in config.rules:
        name = f"rule {rule.name!r}"
        if rule.steer and not config.steering["enabled"]:
            out.append(f"{name}: steer = true has no effect while [steering] enabled = false")
        if rule.sched in ("fifo", "rr", "deadline") and rule.nice != 0:
            out.append(f"{name}: nice is ignored with sched = {rule.sched!r} "
                       "(it applies to sched = \"other\")")
        if rule.sched == "other" and rule.priority != 1:
            out.append(f"{name}: priority is ignored with sched = \"other\" (use nice)")
    return out


def _config_file(args: argparse.Namespace) -> str:
    """`config check FILE` and `config check --config FILE` (dump likewise) name the same."""
    if args.file and args.config and args.file != args.config:
        raise GuestagentError(f"two files given: {args.file} and --config {args.config}")
    return args.file or args.config or DEFAULT_PATH


def cmd_config_check(args: argparse.Namespace) -> int:
    from guestagent.display import escape

    path = _config_file(args)
    config = load_config(path)
    for warning in config_warnings(config):
        print(f"guestagent: warning: {escape(path)}: {escape(warning)}", file=sys.stderr)
    n = len(config.rules)
    print(f"{escape(path)}: OK ({n} {'rule' if n == 1 else 'rules'})")
    return 0


def cmd_config_dump(args: argparse.Namespace) -> int:
    path = _config_file(args)
    config = load_config(path, missing_ok=path == DEFAULT_PATH and not args.file
                         and not args.config)
    sys.stdout.write(render_config(config))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    def client(name: str, func, help: str, description: str | None = None,
               json_too: bool = True) -> argparse.ArgumentParser:
        """A subcommand that asks the running agent, through its control socket."""
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("--config", metavar="FILE",
                       help=f"configuration file (default {DEFAULT_PATH})")
        p.add_argument("--socket", metavar="PATH",
                       help="control socket (default: from the configuration)")
        if json_too:
            p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("run", help="run the agent in the foreground (the daemon)",
                       description="Observe the guest, publish hints to the host, "
                       "read capacity back and steer opt-in tasks. Runs in the foreground; "
                       "SIGHUP reloads the configuration, SIGTERM stops after publishing "
                       "neutral hints.")
    p.add_argument("--config", metavar="FILE",
                   help=f"configuration file (default {DEFAULT_PATH}, defaults if absent)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="override [agent] log_level")
    p.set_defaults(func=cmd_run)

    client("status", cmd_status, "the running agent's state")
    client("hints", cmd_hints, "the hints per vCPU, with their reasons",
           "The hints the running agent publishes; without a running agent, computed once "
           "from the live system.")
    client("capacity", cmd_capacity, "the capacity the host reports per vCPU")
    p = client("watch", cmd_watch, "a live view of status, hints and capacity",
               "On a terminal: redraws in place, fitted to its size, with the time and what "
               "changed since the last refresh; q quits. Otherwise one plain block per "
               "refresh. Waits for an agent that stops answering (a restart). --json: one "
               "line per refresh.")
    p.add_argument("--interval", type=seconds(0.1), default=1.0, metavar="SECONDS",
                   help="refresh period (default 1, at least 0.1)")
    p.add_argument("--count", type=positive_int, metavar="N", help="stop after N refreshes")
    client("reload", cmd_reload, "make the running agent re-read its configuration",
           json_too=False)

    p = sub.add_parser("config", help="check or show the configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    for action, func, what in (
            ("check", cmd_config_check, "validate a configuration file; warn about settings "
             "that have no effect"),
            ("dump", cmd_config_dump, "print the effective configuration, every key explicit")):
        c = csub.add_parser(action, help=what)
        c.add_argument("file", nargs="?", metavar="FILE", help=f"default {DEFAULT_PATH}")
        c.add_argument("--config", metavar="FILE", help="the same as FILE")
        c.set_defaults(func=func)
