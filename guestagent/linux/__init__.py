"""Linux plumbing shared by the agent and the host service, knowing neither.

``procfs`` parses /proc with named fields; ``jsonlines`` is the one JSON-lines
unix-socket listener and client (stale-socket probe, permissions, SO_PEERCRED,
bounded reads); ``atomic`` replaces files whole, durably or not; ``loop`` is the
event loop both daemons run; ``sdnotify`` talks to systemd; ``schema`` is the
declarative TOML machinery both configs use.
"""
