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


def whole_number(noun: str, minimum: int, too_small: str) -> Callable[[str], int]:
    """An integer of at least minimum; `noun` and `too_small` word the two errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: {too_small}")
        return value
    return parse


positive_int = whole_number("a whole number", 1, "expected 1 or more")
cpu_number = whole_number("a CPU number", 0, "CPU numbers start at 0")
