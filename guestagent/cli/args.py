"""argparse types for the command lines: one clear line for a bad value, at parse time."""

from __future__ import annotations

import argparse
import math
from typing import Callable

MAX_SECONDS = 86400.0  # a day: beyond it, time.sleep and select overflow or a typo is likelier


def seconds(minimum: float, allow_zero: bool = False) -> Callable[[str], float]:
    """A finite number of seconds, at least minimum (or exactly 0 when allow_zero)."""
    expected = (f"0, or seconds from {minimum:g} to {MAX_SECONDS:g}" if allow_zero
                else f"seconds from {minimum:g} to {MAX_SECONDS:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if allow_zero and value == 0:
            return 0.0
        if not math.isfinite(value) or not minimum <= value <= MAX_SECONDS:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value
    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 or more")
    return value


def cpu_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CPU number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: CPU numbers start at 0")
    return value
