"""Single-writer sequence locks over 64-byte lines of a shared mapping.

The rule of KVM's steal-time `version` (docs/protocol.md, "Sequence counters"):
the writer makes the counter odd, writes, makes it even; the reader retries
while it is odd or changed, a bounded number of times. Python's buffer copies
are memcpy calls, which x86's store order (TSO) keeps in program order.

The counter itself is read and written as one aligned 4-byte access. struct's
"<I" moves it a byte at a time, so a reader could see a mix of two counter
values (a carry half-written) that equals the one it started from while the
payload changed under it. Nor is it stored with pack_into, which shows readers
a transient 0 (guestagent.linux.words): an even counter, and two such zeros
around a read passed a torn payload as consistent.
"""

from __future__ import annotations

import struct
import sys
from typing import Callable, TypeVar

from guestagent.linux.words import Buffer, store_word

T = TypeVar("T")

READ_RETRIES = 64
_NATIVE = struct.Struct("I")  # native mode: one memcpy of 4 bytes, a single load
_SWAP = sys.byteorder != "little"  # the wire is little-endian


def _bswap(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "little"), "big")


def _load_seq(buf: Buffer, offset: int) -> int:
    """The line's counter, read in one access."""
    value = _NATIVE.unpack_from(buf, offset)[0]
    return _bswap(value) if _SWAP else value


def _store_seq(buf: Buffer, offset: int, value: int) -> None:
    """Set the line's counter in one access."""
    store_word(buf, offset, "I", _bswap(value) if _SWAP else value)


def write_line(buf: Buffer, offset: int, line: bytes) -> int:
    """Write line[4:] at offset under the line's seqlock; returns the new even seq.

    The caller must be the line's only writer. A counter left odd by a writer
    that died mid-update is simply carried on from (it stays odd until done).
    """
    seq = _load_seq(buf, offset)
    odd = seq if seq & 1 else (seq + 1) & 0xFFFFFFFF
    _store_seq(buf, offset, odd)
    buf[offset + 4:offset + len(line)] = line[4:]
    done = (odd + 1) & 0xFFFFFFFF
    _store_seq(buf, offset, done)
    return done


def read_consistent(buf: Buffer, offset: int, read: Callable[[Buffer, int], T],
                    retries: int = READ_RETRIES) -> T | None:
    """read(buf, offset) taken under the line's seqlock, or None if the writer kept
    the line busy for every retry (or died mid-update)."""
    for _ in range(retries):
        before = _load_seq(buf, offset)
        if before & 1:
            continue
        value = read(buf, offset)
        if _load_seq(buf, offset) == before:
            return value
    return None


def read_line(buf: Buffer, offset: int, size: int = 64,
              retries: int = READ_RETRIES) -> bytes | None:
    """A consistent copy of the line, or None (see read_consistent)."""
    return read_consistent(buf, offset, lambda b, o: bytes(b[o:o + size]), retries)
