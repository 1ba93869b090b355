"""The `guestagent-host` deb on this host, started the way its systemd unit says.

The source package is built (testbed/debs.py), `guestagent-host` and its
`python3-guestagent` are installed for real with dpkg, and the service runs the
command line of the installed unit's ExecStart= with the variables of its
EnvironmentFile= (systemd is not PID 1 here, so this test plays its part: the
runtime directory, NOTIFY_SOCKET and WATCHDOG_USEC, SIGTERM, then ExecStopPost=).
The environment file is edited as an operator would, to give the service a
config of this run's own (only this run's domain, an RT cgroup budget) and its
own state directory and status socket. A real libvirtd runs one real TCG domain
with the guest agent inside; the installed service serves it (the vCPU running an
RT task, and the main loop, go FIFO) and restores it on stop. The packages are
purged after, and the host is checked to be as it was.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.waiting import wait_for

from guestagent.host.cgroup import CgroupFs
from testbed.debs import BuildError, build_debs
from testbed.libvirt import Domain, Libvirtd, missing_components, vcpu_tids

pytestmark = [pytest.mark.vm, pytest.mark.root]

PACKAGES = ("guestagent-host", "python3-guestagent")
ENV_FILE = "/etc/default/guestagent-host"
RT_TASK = ["taskset", "-c", "1", "chrt", "-f", "50", "sleep", "900"]


def installed(names) -> dict[str, str]:
    """Package -> dpkg status, for those present in any way (not merely known of)."""
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n",
                           *names], capture_output=True, text=True)
    pairs = (line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return {p: s.strip() for p, s in pairs if s.strip() not in ("un", "pn")}


def dpkg(*args: str) -> subprocess.CompletedProcess:
    """dpkg, waiting a while for its lock if another test holds it."""
    deadline = time.monotonic() + 300
    while True:
        proc = subprocess.run(["dpkg", *args], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        locked = "lock" in proc.stderr and proc.returncode != 0
        if not locked or time.monotonic() > deadline:
            return proc
        time.sleep(2)


def unit_directives(path: str) -> dict[str, list[str]]:
    """The [Service] directives of a unit file, each key with every value in order."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads an EnvironmentFile (quotes removed)."""
    out = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = " ".join(shlex.split(value))
    return out


def command_line(value: str, env: dict[str, str]) -> list[str]:
    """An Exec*= line as systemd runs it: a leading '-'/'@'/'+'/'!' prefix dropped, a
    word that is a bare $VAR split on white space, ${VAR} substituted in place."""
    argv: list[str] = []
    for word in shlex.split(value.lstrip("-@+!:")):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            argv += env.get(word[1:], "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv


def policy(tid: int) -> int:
    try:
        return os.sched_getscheduler(tid) & 0xFF  # without SCHED_RESET_ON_FORK
    except OSError:
        return -1


def cgroup_runtimes(dom: Domain) -> dict[str, int]:
    fs = CgroupFs.find()
    out: dict[str, int] = {}
    for tid in (dom.pid, *vcpu_tids(dom.pid).values()):
        out.update(fs.chain_runtimes(fs.thread_cgroup(dom.pid, tid)))
    return out


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> Iterator[dict[str, Path]]:
    if shutil.which("dpkg-buildpackage") is None:
        pytest.skip("needs dpkg-buildpackage (dpkg-dev, debhelper, dh-python)")
    already = installed(PACKAGES)
    if already:
        pytest.skip(f"{', '.join(already)} already installed on this host: this test "
                    "installs and purges them, and will not touch an operator's copy")
    work = tmp_path_factory.mktemp("debs")
    try:
        built = build_debs(work)
    except BuildError as err:
        pytest.fail(str(err))
    by_name = {p.name.split("_", 1)[0]: p for p in built}
    yield {name: by_name[name] for name in PACKAGES}


def test_installed_deb_serves_a_libvirt_guest_as_its_unit_runs_it(debs, tmp_path):
    missing = missing_components()
    if missing:
        pytest.skip("needs " + "; ".join(missing))
    if CgroupFs.find() is None:
        pytest.skip("needs the cgroup v1 cpu controller with RT group scheduling")
    before_pkgs = installed(PACKAGES)
    etc_before = {p: os.path.exists(p) for p in (ENV_FILE, "/etc/guestagent-host")}
    daemon = Libvirtd()
    dom = Domain(channel=True, shmem=False, prefix="ga-deb")
    svc = None
    created_runtime_dir = False
    try:
        proc = dpkg("-i", str(debs["python3-guestagent"]), str(debs["guestagent-host"]))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        listed = subprocess.run(["dpkg", "-L", "guestagent-host"], capture_output=True,
                                text=True, check=True).stdout.split()
        unit = next(p for p in listed if p.endswith("/guestagent-host.service"))
        service = unit_directives(unit)
        assert service["Type"] == ["notify"]
        env_path = service["EnvironmentFile"][0].lstrip("-")
        assert env_path == ENV_FILE and os.path.exists(env_path)

        dom.start()
        dom.start_agent("channel")
        before = cgroup_runtimes(dom)
        tids = vcpu_tids(dom.pid)

        # The operator's edits: a config of this run's own, named in the environment file.
        state = tmp_path / "state"
        status = tmp_path / "status.sock"
        config = tmp_path / "host.toml"
        config.write_text(f"""\
heartbeat_period = 0.5
max_rt_priority = 10
[host]
libvirt_domains = ["{dom.name}"]
dropin_dir = "{tmp_path / 'vms.d'}"
rt_cgroup_budget_us = 200000
rescan_period = 1.0
""")
        args = f"--config {config} --state-dir {state} --status-socket {status} -v"
        with open(env_path, "a") as f:
            f.write(f'GUESTAGENT_HOST_ARGS="{args}"\n')
        env = env_file(env_path)
        argv = command_line(service["ExecStart"][0], env)
        assert argv[:2] == ["/usr/bin/guestagent-host", "serve"] and "--config" in argv
        # What systemd provides: the runtime directory, the notify socket, the watchdog.
        runtime = f"/run/{service['RuntimeDirectory'][0]}"
        if not os.path.isdir(runtime):
            os.mkdir(runtime, int(service.get("RuntimeDirectoryMode", ["0755"])[0], 8))
            created_runtime_dir = True
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(1.0)
        watchdog_usec = int(service["WatchdogSec"][0].rstrip("s")) * 1_000_000
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            svc = subprocess.Popen(
                argv, stdout=out, stderr=out, cwd="/",
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **env,
                     "NOTIFY_SOCKET": str(tmp_path / "notify"),
                     "WATCHDOG_USEC": str(watchdog_usec)})
        # The installed program, not this checkout's.
        assert os.readlink(f"/proc/{svc.pid}/exe").startswith("/usr/bin/python3")
        messages: list[str] = []

        def notified(word: str) -> bool:
            notify.settimeout(0.2)
            while True:  # drain: what the service sent since
                try:
                    messages.append(notify.recv(4096).decode())
                except OSError:
                    break
            return any(word in m for m in messages)

        assert wait_for(lambda: notified("READY=1"), 120), log.read_text()
        task = dom.spawn(RT_TASK)
        try:
            assert wait_for(lambda: policy(tids[1]) == os.SCHED_FIFO, 240), log.read_text()
            assert wait_for(lambda: policy(dom.pid) == os.SCHED_FIFO, 60), log.read_text()
            shown = subprocess.run(["/usr/bin/guestagent-host", "status", "--status-socket",
                                    str(status)], capture_output=True, text=True, timeout=60)
            assert shown.returncode == 0 and f"libvirt:{dom.name}" in shown.stdout, shown
            assert wait_for(lambda: notified("WATCHDOG=1"), 60)
        finally:
            dom.signal(task, signal.SIGKILL)
        # systemctl stop: SIGTERM, then ExecStopPost=.
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(60) == 0, log.read_text()
        assert notified("STOPPING=1")
        post = subprocess.run(command_line(service["ExecStopPost"][0], env),
                              capture_output=True, text=True, timeout=60)
        assert post.returncode == 0, post
        assert policy(tids[1]) == os.SCHED_OTHER and policy(dom.pid) == os.SCHED_OTHER
        assert cgroup_runtimes(dom) == before
        notify.close()
    finally:
        if svc is not None:  # after a failure too: nothing left boosted or granted
            if svc.poll() is None:
                svc.kill()
                svc.wait(30)
            subprocess.run(["/usr/bin/guestagent-host", "restore", "--state-dir",
                            str(tmp_path / "state")], capture_output=True, timeout=60)
        dom.close()
        daemon.close()
        purged = dpkg("--purge", *PACKAGES)
        if created_runtime_dir:
            shutil.rmtree(runtime, ignore_errors=True)
    assert purged.returncode == 0, purged.stderr
    assert installed(PACKAGES) == before_pkgs
    assert {p: os.path.exists(p) for p in etc_before} == etc_before
    assert not os.path.exists("/usr/bin/guestagent-host")
    assert not os.path.exists("/etc/systemd/system/multi-user.target.wants/"
                              "guestagent-host.service")
