"""The agent's core driven in-process, step by step: scripted link, fake clock."""

from __future__ import annotations

import logging
import os
import time

import pytest
from helpers.agentcore import (
    FakeClock,
    ScriptedLinks,
    ScriptedObserver,
    config,
    make_core,
    run_until,
)
from helpers.snapshots import BATCH, FIFO, cpus, snap, thread
from helpers.threads import sched_thread
from helpers.waiting import wait_for

from guestagent.observe import Observer
from guestagent.protocol.model import PeerState

RT = thread(50, FIFO, 30, cpus=(1,), last=1, comm="rt-probe")


def requests(hints) -> list[str]:
    return [h.request.name for h in hints]


def boosted_then_gone(hold_ms: int = 500):
    """A core that published a boost for vCPU 1, whose thread has just exited."""
    clock = FakeClock()
    observer = ScriptedObserver(snap([RT]))
    links = ScriptedLinks()
    core = make_core(observer, config(hold_ms), clock, links)
    core.step(clock.now)
    link = links.opened[0]
    assert requests(link.last) == ["NEUTRAL", "BOOST"]
    clock.now += 1.0
    observer.changes(snap([]))  # the exit event: the thread is gone
    return clock, observer, links, core, link


def test_the_end_of_a_hold_is_a_deadline_not_the_next_sweep():
    clock, observer, _, core, link = boosted_then_gone(hold_ms=500)
    exited = clock.now
    timers = core.step(clock.now)
    assert requests(link.last) == ["NEUTRAL", "BOOST"]  # held
    assert timers["hold"] == pytest.approx(exited + 0.5)
    sweeps = observer.sweeps
    run_until(core, clock, exited + 0.5)
    assert requests(link.last) == ["NEUTRAL", "NEUTRAL"]
    assert observer.sweeps == sweeps, "the downgrade must not wait for a sweep"
    assert core.step(clock.now)["hold"] is None


def test_a_reconnect_after_the_exit_publishes_the_current_hints_not_the_old_boost():
    clock, _, links, core, first = boosted_then_gone(hold_ms=500)
    core.step(clock.now)
    run_until(core, clock, clock.now + 0.6)
    links.reconnect()  # the link went away and a new one is up
    core.relink_requested = True
    core.step(clock.now)
    again = links.opened[-1]
    assert again is not first and first.closed and PeerState.STOPPING in first.states
    assert again.published, "a new link gets the current hints at once"
    assert requests(again.published[0][1]) == ["NEUTRAL", "NEUTRAL"]
    assert again.published[0][0] == core.generation


def test_a_reconnect_while_held_republishes_the_held_boost_then_the_downgrade():
    clock, _, links, core, _ = boosted_then_gone(hold_ms=500)
    core.step(clock.now)
    links.reconnect()
    core.relink_requested = True
    core.step(clock.now + 0.1)
    again = links.opened[-1]
    assert requests(again.last) == ["NEUTRAL", "BOOST"]  # still within the hold
    run_until(core, clock, clock.now + 0.5)
    assert requests(again.last) == ["NEUTRAL", "NEUTRAL"]


def test_first_snapshot_notes_are_logged_once_and_shown(caplog):
    clock = FakeClock()
    first = snap([])
    first = type(first)(first.taken_at, first.threads, first.nr_threads, first.irqs,
                        first.cpus, ("scheduler-change events unavailable (no tracefs)",))
    with caplog.at_level(logging.WARNING, logger="guestagent.test"):
        core = make_core(ScriptedObserver(first), config(), clock)
        run_until(core, clock, clock.now + 2.0)
    assert "scheduler-change events unavailable (no tracefs)" in core.status(clock.now)["notes"]
    assert caplog.text.count("scheduler-change events unavailable") == 1


def test_status_keeps_its_fields_and_adds_wakeups():
    clock = FakeClock()
    core = make_core(ScriptedObserver(snap([RT])), config(), clock)
    core.step(clock.now)
    core.wakeups = {"observer": 3, "timer:link": 2}
    status = core.status(clock.now)
    assert list(status) == [
        "schema_version", "version", "pid", "uptime_s", "config", "transport", "generation",
        "nr_vcpus", "threads", "threads_of_note", "thread_events", "sched_events", "sweeps",
        "refreshes", "sweep_ms", "sweep_interval_ms", "steered_tasks", "errors", "notes",
        "wakeups"]
    assert status["nr_vcpus"] == 2 and status["sweeps"] == 1 and status["generation"] == 1
    assert status["wakeups"] == {"observer": 3, "timer:link": 2}
    assert status["transport"]["kind"] == "local" and status["transport"]["link"] == "up"


def test_reload_on_defaults_says_so_and_finds_a_file_created_later(tmp_path, caplog):
    clock = FakeClock()
    path = tmp_path / "guestagent.toml"
    core = make_core(ScriptedObserver(snap([])), config(), clock, default_path=str(path))
    with caplog.at_level(logging.INFO, logger="guestagent.test"):
        error = core.reload(clock.now)
        assert error is not None and "built-in defaults" in error and str(path) in error
        assert str(path) in caplog.text  # said in the log, not ignored
        path.write_text("[policy]\nhold_time_ms = 1234\n")
        assert core.reload(clock.now) is None
    assert core.config.policy["hold_time_ms"] == 1234
    assert core.config_path == str(path) and core.status(clock.now)["config"] == str(path)


def test_debug_log_shows_hints_readably(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.DEBUG, logger="guestagent.test"):
        core = make_core(ScriptedObserver(snap([RT])), config(), clock)
        core.step(clock.now)
    line = next(r.getMessage() for r in caplog.records if "hints generation" in r.getMessage())
    assert "vCPU 0 neutral" in line and "vCPU 1 boost fifo 30 [pinned_critical]" in line
    assert "VcpuHint(" not in line and "<" not in line


@pytest.mark.root
def test_a_real_thread_exit_reaches_the_link_after_the_hold_without_a_sweep():
    if os.geteuid() != 0:
        pytest.skip("needs root: SCHED_FIFO threads and the proc connector")
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1")
    links = ScriptedLinks()
    with Observer() as observer:
        if observer.thread_mode != "events":
            pytest.skip("the process-events connector is unavailable here")
        # FIFO 97: above what other tests and benchmarks of this machine use
        with sched_thread(os.SCHED_FIFO, 97, comm=b"core-probe", cpus={1}) as rt:
            core = make_core(observer, config(hold_ms=300), time.monotonic, links)
            core.step(time.monotonic())
            link = links.opened[0]
            assert requests(link.last)[1] == "BOOST", link.published
            if link.last[1].rt_priority != 97:
                pytest.skip(f"another thread on vCPU 1 outranks the probe: {link.last[1]}")
            assert probe_behind_vcpu1(core), core.decision
        ended = time.monotonic()  # the thread has been joined: its exit event is queued

        def dropped() -> bool:
            for fd in observer.fds():
                observer.handle_readable(fd)
            core.step(time.monotonic())
            return not probe_behind_vcpu1(core)

        # far sooner than the 60 s sweep interval: the exit event starts the hold
        assert wait_for(dropped, 30, step=0.01), link.published
        assert time.monotonic() - ended >= 0.3 * 0.9, ("the hold must be kept", core.decision)
        assert link.published[-1][0] == core.generation, "the drop reached the link"
        assert core.refreshes >= 1 and rt.tid not in {t.tid for t in core.snapshot.threads}


def probe_behind_vcpu1(core) -> bool:
    """Whether the probe thread is among vCPU 1's reasons (also while held); other
    work on this shared machine may hold a boost of its own there."""
    return any("core-probe" in r for r in core.decision.vcpus[1].reasons)


def test_the_agent_moves_its_own_threads_off_a_vcpu_it_unboosts_and_back():
    # The affinity calls are recorded rather than made: they would move pytest itself.
    calls: list[tuple[int, frozenset[int]]] = []
    batch = thread(30, BATCH, cpus=(0, 1), last=0, comm="batch")
    lowered = snap([batch], cpu_state=cpus(busy={0: 0.95, 1: 0.3}, lowprio={0: 0.94}))
    clock = FakeClock()
    observer = ScriptedObserver(lowered)
    links = ScriptedLinks()
    core = make_core(observer, config(hold_ms=0), clock, links,
                     set_affinity=lambda tid, cpus: calls.append((tid, cpus)))
    core.own_original = core.own_applied = frozenset({0, 1})
    core.step(clock.now)
    assert requests(links.opened[0].last) == ["UNBOOST", "NEUTRAL"]
    assert {tid for tid, _ in calls} == {int(t) for t in os.listdir("/proc/self/task")}
    assert {c for _, c in calls} == {frozenset({1})}
    calls.clear()
    core.step(clock.now)
    assert calls == [], "nothing to do while the hints stay the same"
    clock.now += 1.0
    observer.changes(snap([], cpu_state=cpus(busy={0: 0.5, 1: 0.3}, lowprio={0: 0.0})))
    run_until(core, clock, clock.now + 0.1)
    assert requests(links.opened[0].last) == ["NEUTRAL", "NEUTRAL"]
    assert {c for _, c in calls} == {frozenset({0, 1})}, "back where it started"
