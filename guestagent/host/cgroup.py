"""The RT cgroup trap: name it, and optionally hand a real-time budget down the cgroup chain.

With CONFIG_RT_GROUP_SCHED (RHEL-family and many distribution kernels, and
these test hosts), a thread may only run SCHED_FIFO/RR if its cpu cgroup has
`cpu.rt_runtime_us` > 0; every cgroup libvirt creates has 0, so
sched_setscheduler() fails with EPERM. `trap()` names the cgroup responsible.

When the operator configures a host-wide total to hand out, `plan_grant()`
(pure) computes new runtimes for the chain from the cgroup below the root down
to each thread's own: each leaf gets `per_thread` µs, each parent at least the
sum of its children (the kernel refuses anything else), never lowering what a
cgroup already had, and never handing out more than the total in all. Values
are written parents first when raised, children first when lowered back;
the old values are kept in a state file (CgroupJournal) before anything is
written, so a crashed service's grants are restored by the next start or by
`guestagent-host restore`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from guestagent.host.undo import ProcessId, StateError
from guestagent.linux.atomic import remove as remove_durably
from guestagent.linux.atomic import write_atomically
from guestagent.sched import POLICY_MASK, PRIORITY_POLICIES

RUNTIME_FILE = "cpu.rt_runtime_us"
JOURNAL_NAME = "undo-cgroups.json"
JOURNAL_FORMAT = "guestagent-host-cgroups"


def cpu_mount(mountinfo: str) -> str | None:
    """Where the cgroup v1 cpu controller is mounted (the RT group knobs are v1 only)."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, extra = left.split(), right.split()
        if len(fields) >= 5 and extra and extra[0] == "cgroup" and len(extra) >= 3:
            if "cpu" in extra[2].split(","):
                return fields[4]
    return None


def cpu_cgroup(proc_cgroup: str) -> str | None:
    """The thread's cgroup path in the v1 cpu hierarchy, from /proc/PID/task/TID/cgroup."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "cpu" in parts[1].split(","):
            return parts[2]
    return None


def chain(path: str) -> list[str]:
    """The cgroups from the one below the root down to `path`: '/a/b' -> ['/a', '/a/b']."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


@dataclass(frozen=True)
class Trap:
    cgroup: str  # the thread's own cgroup
    zero: str  # the highest cgroup in its chain with cpu.rt_runtime_us = 0

    def describe(self) -> str:
        where = self.cgroup if self.zero == self.cgroup else f"{self.cgroup} (via {self.zero})"
        return (f"real-time policies are refused (EPERM) in cpu cgroup {where}: "
                f"{RUNTIME_FILE} = 0 (CONFIG_RT_GROUP_SCHED)")


def trap(cgroup: str, runtimes: Mapping[str, int]) -> Trap | None:
    """The trap a thread in `cgroup` is in, given each chain member's runtime (-1: unlimited)."""
    for node in chain(cgroup):
        if runtimes.get(node) == 0:
            return Trap(cgroup, node)
    return None


@dataclass(frozen=True)
class Grant:
    writes: tuple[tuple[str, int], ...]  # (cgroup, new runtime) in the order to write them
    granted: int  # µs of the total this plan uses
    refused: tuple[str, ...]  # leaves that did not fit in the total


def _children_sum(node: str, values: Mapping[str, int], children: Mapping[str, Iterable[str]]
                  ) -> int:
    return sum(max(0, values.get(c, 0)) for c in children.get(node, ()))


def plan_grant(leaves: Iterable[str], current: Mapping[str, int],
               children: Mapping[str, Iterable[str]], originals: Mapping[str, int],
               per_thread: int, total: int) -> Grant:
    """Runtimes that let every leaf run RT for `per_thread` µs a period, within `total`.

    current: every relevant cgroup's runtime now (the chains of the leaves and their
    siblings); children: each cgroup's child cgroups; originals: runtimes before this
    service changed anything (the total counts only what was added over them at the
    top of each chain). Leaves are taken in order; one that does not fit is refused.
    """
    values = dict(current)
    refused: list[str] = []

    def used(vals: Mapping[str, int]) -> int:
        tops = {c for c in vals if c.count("/") == 1}
        return sum(max(0, vals[t] - max(0, originals.get(t, current.get(t, 0))))
                   for t in tops)

    for leaf in leaves:
        trial = dict(values)
        trial[leaf] = max(trial.get(leaf, 0), per_thread)
        for node in reversed(chain(leaf)[:-1]):  # parents, bottom up
            trial[node] = max(trial.get(node, 0), _children_sum(node, trial, children))
        if used(trial) > total:
            refused.append(leaf)
            continue
        values = trial
    changed = {c: v for c, v in values.items() if v != current.get(c)}
    # Raise parents before children; lower children before parents.
    up = sorted((c for c in changed if changed[c] > current.get(c, 0)), key=lambda c: c.count("/"))
    down = sorted((c for c in changed if changed[c] < current.get(c, 0)),
                  key=lambda c: -c.count("/"))
    return Grant(tuple((c, changed[c]) for c in down + up), used(values), tuple(refused))


class CgroupFs:
    """The cpu controller's files, under a mount point (a test may point it elsewhere)."""

    def __init__(self, mount: str) -> None:
        self.mount = mount

    @classmethod
    def find(cls) -> CgroupFs | None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mount = cpu_mount(f.read())
        except OSError:
            return None
        if mount is None or not os.path.exists(os.path.join(mount, RUNTIME_FILE)):
            return None  # cgroup v2, or a kernel without RT group scheduling: no trap
        return cls(mount)

    def _dir(self, cgroup: str) -> str:
        return os.path.join(self.mount, cgroup.lstrip("/"))

    def runtime(self, cgroup: str) -> int | None:
        try:
            with open(os.path.join(self._dir(cgroup), RUNTIME_FILE), encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def set_runtime(self, cgroup: str, value: int) -> None:
        with open(os.path.join(self._dir(cgroup), RUNTIME_FILE), "w", encoding="ascii") as f:
            f.write(f"{value}\n")

    def children(self, cgroup: str) -> list[str]:
        try:
            entries = os.scandir(self._dir(cgroup))
        except OSError:
            return []
        with entries:
            base = cgroup.rstrip("/")
            return sorted(f"{base}/{e.name}" for e in entries if e.is_dir(follow_symlinks=False))

    def thread_cgroup(self, pid: int, tid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/task/{tid}/cgroup", encoding="utf-8",
                      errors="replace") as f:
                return cpu_cgroup(f.read())
        except OSError:
            return None

    def rt_threads(self, cgroup: str) -> list[int]:
        """Threads of this cgroup (not its children) at an RT policy: what keeps the
        kernel from taking its RT runtime back."""
        try:
            with open(os.path.join(self._dir(cgroup), "tasks"), encoding="ascii") as f:
                tids = [int(t) for t in f.read().split()]
        except (OSError, ValueError):
            return []
        out = []
        for tid in tids:
            try:
                if os.sched_getscheduler(tid) & POLICY_MASK in PRIORITY_POLICIES:
                    out.append(tid)
            except OSError:
                pass
        return out

    def chain_runtimes(self, cgroup: str) -> dict[str, int]:
        out = {}
        for node in chain(cgroup):
            value = self.runtime(node)
            if value is not None:
                out[node] = value
        return out


@dataclass(frozen=True)
class CgroupRecord:
    owner: ProcessId
    originals: Mapping[str, int]  # cgroup -> runtime before the first change


def encode_record(rec: CgroupRecord) -> bytes:
    doc = {"format": JOURNAL_FORMAT, "version": 1,
           "owner": {"pid": rec.owner.pid, "start_time": rec.owner.start_time},
           "cgroups": dict(sorted(rec.originals.items()))}
    return (json.dumps(doc, indent=1) + "\n").encode()


def decode_record(data: bytes) -> CgroupRecord:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise StateError(f"not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT or doc.get(
            "version") != 1 or set(doc) != {"format", "version", "owner", "cgroups"}:
        raise StateError(f"not a {JOURNAL_FORMAT} version 1 document")
    owner, groups = doc["owner"], doc["cgroups"]
    if (not isinstance(owner, dict) or set(owner) != {"pid", "start_time"}
            or not all(isinstance(owner[k], int) and not isinstance(owner[k], bool)
                       and owner[k] >= 0 for k in owner)):
        raise StateError("owner: expected pid and start_time")
    if not isinstance(groups, dict):
        raise StateError("cgroups: expected an object")
    for path, value in groups.items():
        if (not path.startswith("/") or "/../" in f"{path}/" or "\0" in path
                or not isinstance(value, int) or isinstance(value, bool) or value < -1):
            raise StateError(f"cgroups: bad entry {path!r}")
    return CgroupRecord(ProcessId(owner["pid"], owner["start_time"]), dict(groups))


class CgroupJournal:
    """Original runtimes of every cgroup this service changed, on disk before each change."""

    def __init__(self, state_dir: str, owner: ProcessId,
                 inherited: Mapping[str, int] | None = None) -> None:
        """`inherited`: originals a killed predecessor recorded and that could not be put
        back yet; this journal takes them over (on disk at once) so they are never lost."""
        self.path = os.path.join(state_dir, JOURNAL_NAME)
        self.record = CgroupRecord(owner, {})
        if inherited:
            self.remember(inherited)

    def remember(self, originals: Mapping[str, int]) -> None:
        """Add cgroups not yet recorded (their first original wins); OSError if it cannot."""
        new = {c: v for c, v in originals.items() if c not in self.record.originals}
        if not new:
            return
        grown = CgroupRecord(self.record.owner, {**self.record.originals, **new})
        write_atomically(self.path, encode_record(grown))
        self.record = grown

    def forget(self, cgroups: Iterable[str]) -> None:
        left = {c: v for c, v in self.record.originals.items() if c not in set(cgroups)}
        self.record = CgroupRecord(self.record.owner, left)
        if left:
            write_atomically(self.path, encode_record(self.record))
        else:
            remove_durably(self.path)


@dataclass(frozen=True)
class Restored:
    lines: tuple[str, ...]
    failed: frozenset[str]  # cgroups whose runtime could not be put back (yet)


def restore_record(fs: CgroupFs, rec: CgroupRecord) -> Restored:
    """Put recorded runtimes back, deepest first; cgroups that are gone are skipped.

    A parent never goes below what its children hold, so one that cannot be lowered
    (the kernel refuses while a real-time thread is in it) keeps its parents up too:
    every cgroup left above its original is reported failed and stays recorded."""
    lines = []
    failed = set()
    for node in sorted(rec.originals, key=lambda c: -c.count("/")):
        now = fs.runtime(node)
        if now is None:
            lines.append(f"cgroup {node} is gone; nothing to restore")
            continue
        want = max(rec.originals[node], sum(max(0, fs.runtime(c) or 0)
                                            for c in fs.children(node)))
        if now != want:
            try:
                fs.set_runtime(node, want)
                lines.append(f"cgroup {node}: {RUNTIME_FILE} {now} -> {want}")
            except OSError as err:
                why = err.strerror or str(err)
                rt = fs.rt_threads(node)
                if rt:
                    why = "real-time threads are still in it (tids " + ", ".join(
                        map(str, rt[:8])) + (", ..." if len(rt) > 8 else "") + ")"
                lines.append(f"cgroup {node}: cannot restore {RUNTIME_FILE} {want}: {why}")
                want = now
        if want != rec.originals[node]:
            failed.add(node)
    return Restored(tuple(lines), frozenset(failed))


class CgroupGranter:
    """Hands RT runtime to the cgroups of threads that are to be boosted, within a total."""

    def __init__(self, fs: CgroupFs, journal: CgroupJournal, per_thread: int, total: int
                 ) -> None:
        self.fs = fs
        self.journal = journal
        self.per_thread = per_thread
        self.total = total
        self.owners: dict[str, set[str]] = {}  # cgroup granted -> the VMs it was for

    @property
    def used(self) -> int:
        """µs per period handed out: what the top of each chain has over its original."""
        return sum(max(0, (self.fs.runtime(c) or 0) - max(0, v))
                   for c, v in self.journal.record.originals.items() if c.count("/") == 1)

    def _view(self, leaves: Iterable[str]) -> tuple[dict[str, int], dict[str, list[str]]]:
        current: dict[str, int] = {}
        children: dict[str, list[str]] = {}
        for leaf in leaves:
            for node in chain(leaf):
                parent = node.rsplit("/", 1)[0] or "/"
                if parent != "/" and parent not in children:
                    children[parent] = self.fs.children(parent)
                    for sibling in children[parent]:
                        value = self.fs.runtime(sibling)
                        if value is not None:
                            current[sibling] = value
                value = self.fs.runtime(node)
                if value is not None:
                    current[node] = value
        return current, children

    def _write(self, writes: Iterable[tuple[str, int]]) -> str | None:
        for node, value in writes:
            try:
                self.fs.set_runtime(node, value)
            except OSError as err:
                return f"cgroup {node}: cannot set {RUNTIME_FILE} {value}: {err.strerror or err}"
        return None

    def holds(self, leaf: str) -> bool:
        return leaf in self.owners

    def grant(self, leaf: str, owner: str = "") -> str | None:
        """Give `leaf` its runtime for `owner` (a VM); None when done, else one line
        saying why not. A cgroup shared by VMs is given back when the last one goes."""
        if leaf in self.owners:
            self.owners[leaf].add(owner)
            return None
        current, children = self._view([leaf])
        originals = {**current, **self.journal.record.originals}
        plan = plan_grant([leaf], current, children, originals, self.per_thread, self.total)
        if plan.refused:
            return (f"cgroup {leaf}: the RT budget to hand out ({self.total} µs per period) "
                    f"is used up ({self.used} µs granted)")
        try:
            self.journal.remember({c: current[c] for c, _ in plan.writes if c in current})
        except OSError as err:
            return f"cannot record cgroup runtimes in {self.journal.path}: {err.strerror or err}"
        error = self._write(plan.writes)
        if error is None:
            self.owners[leaf] = {owner}
        return error

    def release(self, owner: str | None = None) -> list[str]:
        """Give back what `owner`'s grants (None: every grant) needed and no grant left
        still needs. What the kernel refuses to give back stays recorded, to be retried
        by the next release, the next start or `guestagent-host restore`."""
        for leaf in list(self.owners):
            self.owners[leaf].discard(owner)  # type: ignore[arg-type]
            if owner is None or not self.owners[leaf]:
                del self.owners[leaf]
        needed = {node for leaf in self.owners for node in chain(leaf)}
        originals = self.journal.record.originals
        # Parents still needed shrink to what their children hold; the rest go back.
        result = restore_record(self.fs, CgroupRecord(self.journal.record.owner, {
            c: v for c, v in originals.items() if c not in self.owners}))
        done = [c for c in originals if c not in needed and c not in result.failed]
        if done:
            self.journal.forget(done)
        return list(result.lines)
