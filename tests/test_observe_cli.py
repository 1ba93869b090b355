"""`guestagent tasks|irqs|cpus`: tables, --json schema, filters, and running unprivileged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers.threads import sched_thread

pytestmark = pytest.mark.root

TREES = os.path.join(os.path.dirname(__file__), "data", "trees")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guestagent", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def cli_json(*args: str) -> dict:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema_version"] == 1 and doc["kind"] == args[0]
    return doc


def test_tasks_table_and_json_from_a_tree():
    tree = os.path.join(TREES, "vm64")
    proc = cli("tasks", "--rt", "--tree", tree)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["TID", "PID", "POLICY", "PRIO", "NICE", "AFFINITY", "CPU", "S",
                              "UNIT", "COMM"]
    assert all(header.index("POLICY") == r.index(r.split()[2], len(r.split()[0]))
               for r in rows)  # aligned
    doc = cli_json("tasks", "--rt", "--tree", tree)
    policies = {t["policy"] for t in doc["tasks"]}
    assert policies <= {"FIFO", "RR", "DEADLINE"}
    cyclic = next(t for t in doc["tasks"] if t["tid"] == 4101)
    assert cyclic == {
        "tid": 4101, "tgid": 4100, "comm": "cyclictest", "policy": "FIFO", "rt_priority": 95,
        "nice": 0, "dl_runtime_ns": 0, "dl_deadline_ns": 0, "dl_period_ns": 0,
        "affinity": [60], "last_cpu": 60, "state": "S",
        "cgroup": "/rt.slice/cyclictest.service", "unit": "cyclictest.service",
        "exe": "/usr/bin/cyclictest", "kthread": False}
    only60 = cli_json("tasks", "--cpu", "60", "--tree", tree)["tasks"]
    assert {t["tid"] for t in only60} == {900, 1500, 1501, 4101}


def test_irqs_and_cpus_json_from_trees():
    rt = os.path.join(TREES, "preempt-rt")
    doc = cli_json("irqs", "--threaded", "--cpu", "2", "--tree", rt)
    assert {i["irq"] for i in doc["irqs"]} == {16, 133, 143}
    shared = next(i for i in doc["irqs"] if i["irq"] == 16)
    assert [t["comm"] for t in shared["threads"]] == ["irq/16-ehci_hcd", "irq/16-s-ehci_h"]
    assert shared["effective_affinity"] == [2] and shared["counts"] == [0, 0, 300, 0]
    nic = cli_json("irqs", "--tree", rt)["irqs"]
    assert {i["irq"] for i in nic if i["netdevs"] == ["eth0"]} == {131, 132, 133, 134, 135}
    cpus = cli_json("cpus", "--tree", os.path.join(TREES, "offline"))
    assert cpus["online"] == [0, 1, 2, 3, 6] and cpus["possible"] == list(range(8))
    six = cpus["cpus"][6]
    assert six["online"] and six["pinned_critical"] == ["thread 700 'rtapp' FIFO 50 pinned here"]
    assert cpus["cpus"][4] == {"cpu": 4, "online": False, "isolated": False,
                               "nohz_full": False, "partition": False, "steal": None,
                               "pinned_critical": []}


def test_bad_tree_is_one_line_error(tmp_path):
    proc = cli("cpus", "--tree", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "not a recorded tree" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set SCHED_FIFO")
def test_live_tasks_shows_real_rt_thread():
    with sched_thread(os.SCHED_FIFO, 33, comm=b"cli-rt a) b(c") as t:
        doc = cli_json("tasks", "--rt")
    mine = [x for x in doc["tasks"] if x["tid"] == t.tid]
    assert mine and mine[0]["comm"] == "cli-rt a) b(c" and mine[0]["rt_priority"] == 33
    proc = cli("irqs")
    assert proc.returncode == 0 and proc.stdout.startswith("IRQ")
    proc = cli("cpus", "--interval", "0.05")
    assert proc.returncode == 0 and proc.stdout.startswith("CPU")


DROP_AND_RUN = textwrap.dedent("""
    import os, sys
    import guestagent.cli, guestagent.observe, pyudev, json  # noqa
    parser = guestagent.cli.build_parser()  # imports every CLI area while still root
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    args = parser.parse_args(sys.argv[1:])
    sys.exit(guestagent.cli.run_command(args.func, args, parser.prog))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to the nobody user")
@pytest.mark.parametrize("args", [["tasks", "--all"], ["tasks", "--rt", "--json"],
                                  ["irqs"], ["cpus", "--json"]])
def test_unprivileged_run_shows_what_it_can(args):
    # The interpreter lives under /root here, unreadable to nobody: import first, then drop.
    proc = subprocess.run([sys.executable, "-c", DROP_AND_RUN, *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip()
    for line in proc.stderr.splitlines():
        assert line.startswith("guestagent: note: ")
