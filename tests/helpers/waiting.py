"""Waiting for a condition, with a timeout sized for a busy machine."""

from __future__ import annotations

import time
from typing import Callable


def wait_for(predicate: Callable[[], object], timeout: float, step: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
