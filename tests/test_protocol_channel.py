"""Channel codec: golden lines, round trips, framing, and what decoders refuse."""

from __future__ import annotations

import json

import pytest

from guestagent.protocol.channel import (
    ENTRIES_PER_PART,
    MAX_LINE,
    LineDropped,
    LineFramer,
    decode_line,
    encode_message,
)
from guestagent.protocol.errors import ProtocolError
from guestagent.protocol.messages import (
    Ack,
    Capacity,
    CapacityPart,
    Error,
    Heartbeat,
    Hello,
    Hints,
    HintsPart,
    Sync,
    SyncAck,
    Unknown,
    Welcome,
)
from guestagent.protocol.model import (
    AppliedFlag,
    Feature,
    HintFlag,
    PeerState,
    Request,
    SchedClass,
    VcpuCapacity,
    VcpuHint,
)

BOOST = VcpuHint(1, Request.BOOST, SchedClass.FIFO, 50, 0, HintFlag.CRITICAL_IRQ, 3)
CAP = VcpuCapacity(0, 512, 1, 300, AppliedFlag.BOOSTED, 7)

# The exact bytes docs/protocol.md shows; a change here changes the wire format.
GOLDEN = [
    (Hello(Feature.CAPACITY | Feature.COLOCATION, 1234, 2, minor=0),  # a 1.0 guest
     b'{"type":"hello","protocol":"org.guestagent.sched","version":[1,0],"features":3,'
     b'"epoch":1234,"nr_vcpus":2}\n'),
    (Welcome(True, Feature.CAPACITY, 5678, minor=0),  # a 1.0 host
     b'{"type":"welcome","protocol":"org.guestagent.sched","version":[1,0],"accepted":true,'
     b'"features":1,"epoch":5678,"reason":""}\n'),
    (Hints(7, (VcpuHint(0), BOOST)),
     b'{"type":"hints","generation":7,"nr_vcpus":2,"part":[0,1],"vcpus":[[1,1,1,50,0,1,3]]}\n'),
    (Capacity(3, (CAP, VcpuCapacity(1))),
     b'{"type":"capacity","seq":3,"nr_vcpus":2,"part":[0,1],"vcpus":[[0,512,1,300,1,7]]}\n'),
    (Ack(7), b'{"type":"ack","generation":7}\n'),
    (Heartbeat(12, PeerState.RUNNING), b'{"type":"heartbeat","seq":12,"state":2}\n'),
    (Error("line-too-long", "dropped"),
     b'{"type":"error","code":"line-too-long","message":"dropped"}\n'),
    (Sync(42), b'{"type":"sync","id":42}\n'),
    # 1.1
    (Hello(Feature.CAPACITY | Feature.COLOCATION, 1234, 2),
     b'{"type":"hello","protocol":"org.guestagent.sched","version":[1,1],"features":3,'
     b'"epoch":1234,"nr_vcpus":2}\n'),
    (Heartbeat(12, PeerState.RUNNING, 5678),
     b'{"type":"heartbeat","seq":12,"state":2,"epoch":5678}\n'),
    (SyncAck(42), b'{"type":"sync-ack","id":42}\n'),
]


@pytest.mark.parametrize("msg, line", GOLDEN, ids=[type(m).__name__ for m, _ in GOLDEN])
def test_golden_lines(msg, line):
    assert encode_message(msg) == line
    decoded = decode_line(line[:-1])
    if isinstance(msg, Hints):
        assert decoded == HintsPart(7, 2, 0, 1, (BOOST,))
    elif isinstance(msg, Capacity):
        assert decoded == CapacityPart(3, 2, 0, 1, (CAP,))
    else:
        assert decoded == msg


def test_large_tables_split_into_parts_under_the_line_limit():
    worst = tuple(VcpuHint(i, Request.BOOST, SchedClass.DEADLINE, 99, -20, HintFlag(15), 65535)
                  for i in range(4096))
    data = encode_message(Hints(2**53 - 1, worst))
    lines = data.split(b"\n")[:-1]
    assert len(lines) == 4096 // ENTRIES_PER_PART
    assert max(len(line) + 1 for line in lines) <= MAX_LINE
    parts = [decode_line(line) for line in lines]
    assert [p.part for p in parts] == [0, 1, 2, 3]
    assert tuple(h for p in parts for h in p.hints) == worst


def test_unknown_fields_ignored_unknown_types_reported():
    line = json.dumps({"type": "ack", "generation": 5, "future": {"x": 1}}).encode()
    assert decode_line(line) == Ack(5)
    assert decode_line(b'{"type":"telemetry","x":1}') == Unknown("telemetry")
    # unknown feature bits dropped; unknown hint values get their documented fallback
    hello = decode_line(b'{"type":"hello","protocol":"p","version":[1,9],"features":255,'
                        b'"epoch":1,"nr_vcpus":1,"extra":true}')
    assert hello.features == Feature(15) and hello.minor == 9
    part = decode_line(b'{"type":"hints","generation":1,"nr_vcpus":1,'
                       b'"vcpus":[[0,9,4,500,-99,255,0,"future"]]}')
    assert part.hints == (VcpuHint(0, Request.NEUTRAL, SchedClass.OTHER, 99, -20,
                                   HintFlag(15), 0),)


@pytest.mark.parametrize("line", [
    b"", b"garbage", b"[1,2]", b'{"type":1}', b"\xc3\x28", b'{"type":"ack"}',
    b'{"type":"ack","generation":-1}', b'{"type":"ack","generation":1.5}',
    b'{"type":"ack","generation":true}', b'{"type":"ack","generation":NaN}',
    b'{"type":"ack","generation":18446744073709551616}',
    b'{"type":"hints","generation":1,"nr_vcpus":2,"vcpus":[[2,0,0,0,0,0,0]]}',
    b'{"type":"hints","generation":1,"nr_vcpus":2,"vcpus":[[0,0,0,0,0,0,0],[0,0,0,0,0,0,0]]}',
    b'{"type":"hints","generation":1,"nr_vcpus":2,"vcpus":[[0,0,0]]}',
    b'{"type":"hints","generation":1,"nr_vcpus":4097,"vcpus":[]}',
    b'{"type":"hints","generation":1,"nr_vcpus":0,"vcpus":[]}',
    b'{"type":"hints","generation":1,"nr_vcpus":2,"part":[2,2],"vcpus":[]}',
    b'{"type":"capacity","seq":1,"nr_vcpus":1,"vcpus":[[0,1,1,1,1,"x"]]}',
    b'{"type":"hello","protocol":"x","version":"1.0","features":0,"epoch":1,"nr_vcpus":1}',
    b'{"type":"welcome","protocol":"x","version":[1,0],"accepted":1,"features":0}',
    b"[" * 50000 + b"]" * 50000,
    b'{"type":"ack","generation":' + b"9" * 5000 + b"}",
])
def test_invalid_lines_raise_protocol_error(line):
    with pytest.raises(ProtocolError):
        decode_line(line)


def test_framer_splits_lines_across_reads():
    framer = LineFramer()
    assert framer.feed(b'{"a"') == []
    assert framer.feed(b':1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert framer.feed(b":3}\n") == [b'{"c":3}']
    assert framer.feed(b"\n\r\n  \n") == []  # blank lines are skipped


def test_framer_0xff_in_mid_line_discards_the_partial_line():
    framer = LineFramer()
    assert framer.feed(b'{"type":"ack","gen\xff{"type":"sync","id":1}\n') == [
        b'{"type":"sync","id":1}']
    assert framer.feed(b"half a line") == []
    assert framer.feed(b"\xff") == []
    assert framer.feed(b"whole\n") == [b"whole"]
    assert framer.resets == 2


def test_framer_drops_oversized_line_and_resynchronises():
    framer = LineFramer()
    out = framer.feed(b"x" * (MAX_LINE - 1) + b"\nok\n")  # exactly the limit: kept
    assert [len(x) for x in out] == [MAX_LINE - 1, 2]
    out = []
    for _ in range(40):  # 40 * 4 KiB without a newline, fed in pieces
        out += framer.feed(b"y" * 4096)
    out += framer.feed(b"tail\nnext\n")
    assert len(out) == 2 and isinstance(out[0], LineDropped) and out[1] == b"next"
    assert out[0].size >= MAX_LINE
    # a 0xFF also ends the skipping
    assert isinstance(framer.feed(b"z" * MAX_LINE)[0], LineDropped)
    assert framer.feed(b"\xffafter\n") == [b"after"]


def test_encoder_refuses_tables_out_of_order():
    with pytest.raises(ProtocolError):
        encode_message(Hints(1, (VcpuHint(1), VcpuHint(0))))
