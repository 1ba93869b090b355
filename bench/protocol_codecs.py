"""Cost of the protocol's hot paths, beside the naive way, in one run.

    python3 bench/protocol_codecs.py

Prints p50/p99 per operation: a seqlocked slot read vs a plain copy of the
same 64 bytes, a 64-vCPU hints table through the channel codec vs json.dumps
of dicts, and one decoded line.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict

from guestagent.protocol.channel import decode_line, encode_message
from guestagent.protocol.messages import Hints
from guestagent.protocol.model import Request, SchedClass, VcpuHint
from guestagent.protocol.region import RegionLayout, decode_guest_slot, encode_guest_slot
from guestagent.transport.seqlock import read_line, write_line


def measure(fn, rounds: int = 2000, inner: int = 20) -> tuple[float, float]:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter_ns() - t0) / inner / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def main() -> None:
    lay = RegionLayout(64)
    buf = bytearray(lay.region_size)
    for i in range(64):
        write_line(buf, lay.guest_slot(i), encode_guest_slot(VcpuHint(i, Request.BOOST), 1))
    off = lay.guest_slot(5)
    hints = tuple(VcpuHint(i, Request.BOOST if i % 4 == 0 else Request.NEUTRAL,
                           SchedClass.FIFO, 50) for i in range(64))
    line = encode_message(Hints(9, hints)).rstrip(b"\n")
    rows = [
        ("slot read, seqlock + decode", lambda: decode_guest_slot(5, read_line(buf, off))),
        ("slot read, plain copy + decode", lambda: decode_guest_slot(5, bytes(buf[off:off + 64]))),
        ("hints encode (64 vCPUs)", lambda: encode_message(Hints(9, hints))),
        ("naive json.dumps of dataclass dicts", lambda: json.dumps([asdict(h) for h in hints])),
        ("hints line decode (64 vCPUs)", lambda: decode_line(line)),
    ]
    results = {}
    for name, fn in rows:
        results[name] = measure(fn, rounds=500 if "64" in name else 2000)
        p50, p99 = results[name]
        print(f"{name:40s} p50 {p50:8.2f} us   p99 {p99:8.2f} us")
    ratio = (results["slot read, seqlock + decode"][0]
             / results["slot read, plain copy + decode"][0])
    print(f"seqlock read / plain read (p50): {ratio:.2f}x")
    ratio = results["hints encode (64 vCPUs)"][0] / results[
        "naive json.dumps of dataclass dicts"][0]
    print(f"hints encode / naive dumps (p50): {ratio:.2f}x")


if __name__ == "__main__":
    main()
