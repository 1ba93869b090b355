"""Any bytes into any decoder: a value or ProtocolError, never another exception.

The default suite runs a few hundred examples per decoder. The dedicated run:
    GUESTAGENT_FUZZ_EXAMPLES=100000 python3 -m pytest -m fuzz tests/test_protocol_fuzz.py
"""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestagent.protocol.channel import MAX_LINE, LineFramer, decode_line
from guestagent.protocol.connection import GuestConnection, HostConnection
from guestagent.protocol.errors import ProtocolError
from guestagent.protocol.model import Feature
from guestagent.protocol.region import (
    check_layout,
    decode_guest_control,
    decode_guest_slot,
    decode_header,
    decode_host_control,
    decode_host_slot,
)
from guestagent.protocol.session import GuestRegionSession, HostRegionSession

DEFAULT_EXAMPLES = 200
# the fuzz-marked tests also run (briefly) in the default suite unless deselected
FUZZ_EXAMPLES = int(os.environ.get("GUESTAGENT_FUZZ_EXAMPLES", 50))


def _settings(examples: int):
    return settings(max_examples=examples, deadline=1000, database=None,
                    suppress_health_check=list(HealthCheck))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.sampled_from([0, 1, 2, 4096, 4097, -1, 1.5, float("nan")]) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)
_types = st.sampled_from(["hello", "welcome", "hints", "capacity", "ack", "heartbeat", "error",
                          "sync", "sync-ack", "other"])
_fields = st.sampled_from(["protocol", "version", "features", "epoch", "nr_vcpus",
                           "accepted", "reason", "generation", "part", "vcpus", "seq",
                           "state", "code", "message", "id"])
# near-valid objects reach far deeper into the decoders than random bytes do
_objects = st.builds(lambda t, d: json.dumps({"type": t, **d}).encode(), _types,
                     st.dictionaries(_fields, _json_values, max_size=8))
_lines = st.binary(max_size=512) | _objects


def check_line(line: bytes) -> None:
    try:
        decode_line(line)
    except ProtocolError:
        pass


def check_region(data: bytes) -> None:
    for decode in (decode_guest_control, decode_host_control):
        decode(data.ljust(64, b"\0")[:64])
    decode_guest_slot(0, data.ljust(64, b"\0")[:64])
    decode_host_slot(0, data.ljust(64, b"\0")[:64])
    try:
        check_layout(decode_header(data), len(data))
    except ProtocolError:
        pass
    # the sessions take any bytes as the peer's lines and header
    line = data.ljust(64, b"\0")[:64]
    guest = GuestRegionSession(Feature.CAPACITY, 1, 2)
    if guest.receive_host(1, line, 0.0):
        guest.receive_capacity([line, line], 0.0)
    guest.state(0.0)
    host = HostRegionSession(Feature.CAPACITY, 2)
    if host.receive_guest(line, 0.0):
        host.judge(data.ljust(128, b"\0")[:128], len(data))
    if host.wants_hints(0.0):
        host.receive_hints(())
    host.check_header(data[:128])
    host.state(0.0)


def check_stream(chunks: list[bytes]) -> None:
    guest = GuestConnection(Feature.CAPACITY, 1, 4)
    host = HostConnection(Feature.CAPACITY, 2)
    guest.connect()
    host.receive_data(guest.data_to_send())
    guest.receive_data(host.data_to_send())
    for chunk in chunks:
        guest.receive_data(chunk)
        host.receive_data(chunk)
        assert len(host.data_to_send()) <= len(chunk) * 4 + 4096  # replies stay bounded


def _region_bytes():
    # headers with our magic and name but random fields, and plain random bytes
    valid = bytes.fromhex("4755455354414754") + b"org.guestagent.sched".ljust(32, b"\0")
    return st.binary(max_size=400) | st.binary(min_size=88, max_size=400).map(
        lambda b: valid + b[40:])


@_settings(DEFAULT_EXAMPLES)
@given(_lines)
def test_decode_line_any_bytes(line):
    check_line(line)


@_settings(DEFAULT_EXAMPLES)
@given(_region_bytes())
def test_region_decoders_any_bytes(data):
    check_region(data)


@_settings(DEFAULT_EXAMPLES // 4)
@given(st.lists(st.binary(max_size=300) | _objects.map(lambda b: b + b"\n"), max_size=10))
def test_connections_any_stream(chunks):
    check_stream(chunks)


def test_bounded_time_and_memory_on_hostile_lines():
    framer = LineFramer()
    tracemalloc.start()
    try:
        for _ in range(20):  # 20 x 1 MiB with no newline: never buffered beyond a line
            assert len(framer.feed(b"[" * (1 << 20))) <= 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MAX_LINE + (2 << 20)
    for line in (b"[" * (MAX_LINE - 1), b'{"a":' * 10000 + b"1" + b"}" * 10000,
                 b'{"type":"hints","generation":1,"nr_vcpus":4096,"vcpus":['
                 + b",".join([b"[0,0,0,0,0,0,0]"] * 4000) + b"]}"):
        check_line(line)


@pytest.mark.fuzz
@_settings(FUZZ_EXAMPLES)
@given(_lines)
def test_fuzz_decode_line(line):
    check_line(line)


@pytest.mark.fuzz
@_settings(FUZZ_EXAMPLES)
@given(_region_bytes())
def test_fuzz_region_decoders(data):
    check_region(data)


@pytest.mark.fuzz
@_settings(max(FUZZ_EXAMPLES // 10, 1))
@given(st.lists(st.binary(max_size=300) | _objects.map(lambda b: b + b"\n"), max_size=10))
def test_fuzz_connections(chunks):
    check_stream(chunks)
