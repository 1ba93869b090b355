"""Young threads: re-checked a few times shortly after birth.

A new real-time thread usually sets its policy within microseconds to
milliseconds of starting (pthread_create then sched_setscheduler, or chrt then
exec). Sweeping every thread that often would cost far too much; asking only
the newborns, at a few fixed ages, finds them within a few milliseconds for the
price of one sched_getscheduler per check.

Times are CLOCK_MONOTONIC seconds (``time.monotonic()``): the proc connector
stamps its events with that clock.
"""

from __future__ import annotations

from collections import deque

# ages at which a newborn is asked for its policy: early enough for the usual
# "start, then set FIFO", late enough to catch threads that set up first
YOUNG_CHECKS = (0.002, 0.010, 0.040, 0.150)
# newborns tracked at once: a fork storm of 1,000 births/s keeps about 150
YOUNG_CAP = 4096
# checks due within this much of each other are done in one wake-up, so a fork
# storm costs at most 1/YOUNG_COALESCE wake-ups per second
YOUNG_COALESCE = 0.005
# With scheduler-change wake-ups, a thread that sets its policy after birth is
# named by its syscall, and one born real-time by its first wake-up (where the
# kernel has that tracepoint): the newborn only needs one look, when its fork
# event is read, as a backstop that costs no wake-up of its own.
WATCHED_YOUNG_CHECKS = (0.0,)


class YoungThreads:
    """Newborn threads by check stage; each stage is a FIFO in birth order, so
    the earliest due check of a stage is always at its head."""

    def __init__(self, ages: tuple[float, ...] = YOUNG_CHECKS, cap: int = YOUNG_CAP,
                 coalesce: float = YOUNG_COALESCE) -> None:
        self.cap = cap
        self._count = 0
        self._last_check = float("-inf")
        self.dropped = 0  # births not tracked because the set was full
        self.retime(ages, coalesce)

    def retime(self, ages: tuple[float, ...], coalesce: float) -> None:
        """Check at other ages from now on; the newborns tracked so far each get the
        first of the new checks."""
        pending = sorted((born, tid) for stage in getattr(self, "_stages", ())
                         for born, tid in stage)
        self.ages, self.coalesce = ages, coalesce
        self._stages: list[deque[tuple[float, int]]] = [deque() for _ in ages]
        self._stages[0].extend(pending)
        self._count = len(pending)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, tid: object) -> bool:  # a scan: for tests and inspection
        return any(t == tid for stage in self._stages for _, t in stage)

    def add(self, tid: int, born: float) -> None:
        if self._count >= self.cap:
            for stage in reversed(self._stages):  # the later stages hold the oldest
                if stage:
                    stage.popleft()
                    self._count -= 1
                    self.dropped += 1
                    break
        self._stages[0].append((born, tid))
        self._count += 1

    def deadline(self) -> float | None:
        """When the next check is due (never sooner than the coalescing gap)."""
        if not self._count:  # the usual case, asked at every turn of the loop
            return None
        due = [stage[0][0] + age for stage, age in zip(self._stages, self.ages) if stage]
        if not due:
            return None
        return max(min(due), self._last_check + self.coalesce)

    def take_due(self, now: float) -> list[tuple[int, float, int]]:
        """(stage, birth, tid) of every check due at ``now``; they leave the set."""
        out: list[tuple[int, float, int]] = []
        for k, (stage, age) in enumerate(zip(self._stages, self.ages)):
            limit = now - age
            while stage and stage[0][0] <= limit:
                born, tid = stage.popleft()
                out.append((k, born, tid))
        self._count -= len(out)
        self._last_check = now
        return out

    def again(self, stage: int, born: float, tid: int) -> None:
        """Schedule the next check of a thread that did not matter yet; after the
        last stage it is no longer young."""
        if stage + 1 < len(self._stages):
            self._stages[stage + 1].append((born, tid))
            self._count += 1

    def clear(self) -> None:
        for stage in self._stages:
            stage.clear()
        self._count = 0
