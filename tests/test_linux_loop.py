"""The shared event loop: fds that come and go, named timers, signals, wake-ups."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from guestagent.linux.loop import Loop


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_due_timer_is_reported_once_and_removed() -> None:
    clock = FakeClock()
    with Loop(clock) as loop:
        loop.at("sweep", 100.0)
        loop.at("later", 1e9)
        assert loop.wait() == {"sweep"}
        assert loop.due("sweep") is None and loop.due("later") == 1e9
        loop.at("later", None)
        assert loop.next_deadline() is None
        assert loop.wakeups["timer:sweep"] == 1


def test_readable_fds_reach_their_callback_and_can_leave() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    got: list[int] = []

    def read(fd: int) -> None:
        got.append(fd)
        os.read(fd, 10)

    try:
        with Loop() as loop:
            loop.follow("observer", [r1, r2, None], read)
            os.write(w1, b"x")
            os.write(w2, b"x")
            loop.wait(limit=5.0)
            assert sorted(got) == sorted([r1, r2])
            loop.follow("observer", [r2], read)  # r1 went away
            assert loop.watched("observer") == {r2}
            got.clear()
            os.write(w1, b"x")
            assert loop.wait(limit=0.05) == frozenset()
            assert got == []
            assert loop.wakeups["observer"] == 1
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_a_callback_that_drops_another_fd_does_not_call_it() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    calls: list[int] = []
    try:
        with Loop() as loop:
            def drop_other(fd: int) -> None:
                calls.append(fd)
                os.read(fd, 10)
                loop.forget("b" if fd == r1 else "a")

            loop.watch("a", r1, drop_other)
            loop.watch("b", r2, drop_other)
            os.write(w1, b"x")
            os.write(w2, b"x")
            loop.wait(limit=5.0)
            assert len(calls) == 1
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_wake_from_another_thread_ends_a_wait_without_a_timer() -> None:
    with Loop() as loop:
        timer = threading.Timer(0.05, loop.wake)
        timer.start()
        assert loop.wait(limit=60.0) == frozenset()
        timer.join()
        assert loop.wakeups["wake"] == 1


def test_a_caught_signal_runs_its_callback_from_wait_and_close_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    got: list[int] = []
    with Loop() as loop:
        loop.catch([signal.SIGUSR1], got.append)
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        loop.wait(limit=60.0)
        timer.join()
        if not got:  # the handler ran after poll returned: the next wait delivers it
            loop.wait(limit=0.0)
        assert got == [signal.SIGUSR1]
        assert loop.wakeups["signal"] == 1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_signals_need_the_main_thread() -> None:
    errors: list[BaseException] = []

    def attempt() -> None:
        with Loop() as loop:
            try:
                loop.catch([signal.SIGUSR2], lambda s: None)
            except ValueError as err:
                errors.append(err)

    t = threading.Thread(target=attempt)
    t.start()
    t.join()
    assert errors, "signal handlers outside the main thread must be refused"


@pytest.mark.parametrize("limit", [0.0, 0.01])
def test_limit_bounds_the_sleep_without_firing_timers(limit: float) -> None:
    clock = FakeClock()
    with Loop(clock) as loop:
        loop.at("far", 1e9)
        assert loop.wait(limit=limit) == frozenset()
        assert loop.due("far") == 1e9
