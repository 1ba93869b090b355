"""Native words in memory that another process or the kernel reads concurrently.

struct's pack_into zeroes its destination before it writes the value, so a
concurrent reader can see 0 in between: a seqlock's even counter, or a perf
ring's data_tail at 0 (the ring full to the kernel). A memoryview item store
is one memcpy of the value, a single store for an aligned word.
"""

from __future__ import annotations

import mmap
from typing import Union

Buffer = Union[bytearray, memoryview, mmap.mmap]
_SIZES = {"I": 4, "Q": 8}


def store_word(buf: Buffer, offset: int, code: str, value: int) -> None:
    """Store an unsigned native word ("I": 32 bits, "Q": 64) at offset in one access."""
    size = _SIZES[code]
    with memoryview(buf) as whole, whole[offset:offset + size] as raw, \
            raw.cast(code) as word:
        word[0] = value
