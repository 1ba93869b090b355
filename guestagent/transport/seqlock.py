"""Single-writer sequence locks over 64-byte lines of a shared mapping.

The rule of KVM's steal-time `version` (docs/protocol.md, "Sequence counters"):
the writer makes the counter odd, writes, makes it even; the reader retries
while it is odd or changed, a bounded number of times. Python's buffer copies
are memcpy calls, which x86's store order (TSO) keeps in program order.
"""

from __future__ import annotations

import mmap
import struct
from typing import Callable, TypeVar, Union

Buffer = Union[bytearray, memoryview, mmap.mmap]
T = TypeVar("T")

READ_RETRIES = 64
_SEQ = struct.Struct("<I")


def write_line(buf: Buffer, offset: int, line: bytes) -> int:
    """Write line[4:] at offset under the line's seqlock; returns the new even seq.

    The caller must be the line's only writer. A counter left odd by a writer
    that died mid-update is simply carried on from (it stays odd until done).
    """
    seq = _SEQ.unpack_from(buf, offset)[0]
    odd = seq if seq & 1 else (seq + 1) & 0xFFFFFFFF
    _SEQ.pack_into(buf, offset, odd)
    buf[offset + 4:offset + len(line)] = line[4:]
    done = (odd + 1) & 0xFFFFFFFF
    _SEQ.pack_into(buf, offset, done)
    return done


def read_consistent(buf: Buffer, offset: int, read: Callable[[Buffer, int], T],
                    retries: int = READ_RETRIES) -> T | None:
    """read(buf, offset) taken under the line's seqlock, or None if the writer kept
    the line busy for every retry (or died mid-update)."""
    unpack = _SEQ.unpack_from
    for _ in range(retries):
        before = unpack(buf, offset)[0]
        if before & 1:
            continue
        value = read(buf, offset)
        if unpack(buf, offset)[0] == before:
            return value
    return None


def read_line(buf: Buffer, offset: int, size: int = 64,
              retries: int = READ_RETRIES) -> bytes | None:
    """A consistent copy of the line, or None (see read_consistent)."""
    return read_consistent(buf, offset, lambda b, o: bytes(b[o:o + size]), retries)
