"""Targeted refresh: a scheduler-change wake-up re-reads just the threads it names."""

from __future__ import annotations

import os
import select
import threading
import time

import pytest
from helpers.threads import Sleeper

from guestagent.observe import Observer

pytestmark = pytest.mark.root


@pytest.fixture
def observer(tracefs):  # noqa: F811
    with Observer() as obs:
        obs.snapshot(time.monotonic())
        assert obs.changes_watched, "the scheduler watch should be open"
        yield obs


def pump(obs: Observer, timeout: float = 2.0):
    """Handle readable fds until refresh() yields a snapshot (or time runs out)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for fd in select.select(obs.fds(), [], [], 0.05)[0]:
            obs.handle_readable(fd)
        snap = obs.refresh(time.monotonic())
        if snap is not None:
            return snap
    return None


def find(snap, tid):
    return next((t for t in snap.threads if t.tid == tid), None)


def test_a_policy_change_shows_without_a_sweep(observer):
    target = Sleeper()
    try:
        pump(observer, 0.2)  # let the connector report the new thread
        observer.snapshot(time.monotonic(), full=False)
        started = time.monotonic()
        os.sched_setscheduler(target.tid, os.SCHED_FIFO, os.sched_param(7))
        snap = pump(observer)
        assert snap is not None and time.monotonic() - started < 1.0
        info = find(snap, target.tid)
        assert info is not None and info.rt_priority == 7 and info.policy.name == "FIFO"
        os.sched_setscheduler(target.tid, os.SCHED_OTHER, os.sched_param(0))
        snap = pump(observer)
        assert snap is not None and find(snap, target.tid) is None, "no longer matters"
    finally:
        target.end()


def test_a_change_to_nothing_new_yields_no_snapshot(observer):
    me = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me))
    assert pump(observer, 0.3) is None
