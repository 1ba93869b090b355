"""The pure parsers and the proc-connector decoder, including hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guestagent.linux.procfs import (
    ParseError,
    format_cpulist,
    parse_cgroup,
    parse_cpulist,
    parse_interrupts,
    parse_mountinfo_cgroup2,
    parse_proc_stat_steal,
    parse_stat,
    systemd_unit,
)
from guestagent.observe.events import ProcEvent, encode_proc_event, parse_proc_events
from guestagent.observe.parse import irq_thread_number, steal_fractions

# A real line from this machine's irq/24 kthread, with its comm swapped in.
STAT_TAIL = (b" S 2 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 -51 0 1 0 39 0 0 18446744073709551615 0 0 "
             b"0 0 0 0 0 2147483647 0 1 0 0 17 1 50 1 0 0 0 0 0 0 0 0 0 0 0\n")


@given(st.binary(min_size=0, max_size=15).filter(lambda b: b"\0" not in b))
def test_stat_comm_is_any_bytes(comm):
    fields = parse_stat(b"50 (" + comm + b")" + STAT_TAIL)
    assert fields.comm == comm.decode("utf-8", "backslashreplace")
    assert (fields.state, fields.last_cpu, fields.rt_priority, fields.policy, fields.nice) == \
        ("S", 1, 50, 1, 0)


@pytest.mark.parametrize("raw", [b"", b"50 x S 1", b"50 (a) S 1 2 3", b"50 (a" + STAT_TAIL,
                                 b"50 (a)" + STAT_TAIL.replace(b"17 1 50 1", b"17 1 50 z")])
def test_malformed_stat_raises_parse_error(raw):
    with pytest.raises(ParseError):
        parse_stat(raw)


@given(st.frozensets(st.integers(0, 8191), max_size=200))
def test_cpulist_round_trip(cpus):
    assert parse_cpulist(format_cpulist(cpus)) == cpus


@pytest.mark.parametrize("text, cpus", [("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}),
                                        ("\n", set()), ("(null)\n", set()), ("5", {5})])
def test_cpulist_examples(text, cpus):
    assert parse_cpulist(text) == frozenset(cpus)


@pytest.mark.parametrize("text", ["a-b", "3-1", "1,,x"])
def test_bad_cpulist(text):
    with pytest.raises(ParseError):
        parse_cpulist(text)


def test_interrupts_arm_style_level_column_and_shared_actions():
    text = ("           CPU0       CPU1\n"
            " 11:      12345       6789     GICv3  27 Level     arch_timer\n"
            " 47:          0          0  IO-APIC  16-fasteoi   ehci_hcd:usb1, snd_hda_intel\n"
            " 50:          3          0   no-chip\n"
            "IPI0:        10         20       Rescheduling interrupts\n"
            "ERR:          0\n")
    lines, skipped = parse_interrupts(text)
    assert skipped == 0
    a, b, c = lines
    assert (a.irq, a.counts, a.chip, a.hwirq, a.actions) == \
        (11, (12345, 6789), "GICv3", "27 Level", ("arch_timer",))
    assert b.actions == ("ehci_hcd:usb1", "snd_hda_intel") and b.hwirq == "16-fasteoi"
    assert (c.chip, c.hwirq, c.actions) == ("no-chip", "", ())


def test_interrupts_truncated_line_is_counted_not_raised():
    lines, skipped = parse_interrupts("     CPU0  CPU1\n  5:   1\n  6:  x y z\n  7: 1 2 chip\n")
    assert [ln.irq for ln in lines] == [7] and skipped == 2


@pytest.mark.parametrize("text", ["", "no cpus here\n", "CPUx\n"])
def test_interrupts_bad_header(text):
    with pytest.raises(ParseError):
        parse_interrupts(text)


@given(st.text(max_size=400))
def test_interrupts_never_crash_on_noise(text):
    try:
        parse_interrupts(text)
    except ParseError:
        pass


def test_cgroup_prefers_v2_then_systemd():
    assert parse_cgroup("0::/system.slice/chronyd.service\n") == "/system.slice/chronyd.service"
    assert parse_cgroup("9:name=systemd:/user.slice\n4:memory:/x\n0::/\n") == "/"
    assert parse_cgroup("9:name=systemd:/user.slice\n4:memory:/x\n") == "/user.slice"
    assert parse_cgroup("") == ""


@pytest.mark.parametrize("cgroup, unit", [
    ("/system.slice/chronyd.service", "chronyd.service"),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
    ("/system.slice/docker-abc.scope/init", "docker-abc.scope"),
    ("/rt.slice", "rt.slice"), ("/", ""), ("", "")])
def test_systemd_unit(cgroup, unit):
    assert systemd_unit(cgroup) == unit


@pytest.mark.parametrize("comm, n", [("irq/24-ACPI:Ged", 24), ("irq/131-eth0-Tx", 131),
                                     ("irq/16-s-ehci_h", 16), ("irq/x-foo", None),
                                     ("ksoftirqd/0", None), ("irq/", None)])
def test_irq_thread_number(comm, n):
    assert irq_thread_number(comm) == n


def test_steal_and_mountinfo():
    steal = parse_proc_stat_steal("cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
                                  "cpu3 1 2 3 4 5 6 7 50\nintr 5\n")
    assert steal == {0: 8, 3: 50}
    assert steal_fractions({0: 8, 3: 0}, {0: 8, 3: 50, 4: 1}, 1.0, 100) == \
        {0: 0.0, 3: 0.5, 4: 0.0}
    assert steal_fractions({0: 0}, {0: 10**6}, 1.0, 100) == {0: 1.0}  # clamped
    with pytest.raises(ParseError):
        parse_proc_stat_steal("cpuX 1 2\n")
    mi = "35 24 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    assert parse_mountinfo_cgroup2("31 23 0:28 / /x rw - tmpfs tmpfs rw\n" + mi) == \
        "/sys/fs/cgroup/unified"
    assert parse_mountinfo_cgroup2("31 23 0:28 / /x rw - tmpfs tmpfs rw\n") is None


EVENTS = st.one_of(
    st.builds(ProcEvent, st.just("fork"), st.integers(1, 2**22), st.integers(1, 2**22),
              st.integers(1, 2**22)),
    st.builds(ProcEvent, st.sampled_from(["exec", "exit"]), st.integers(1, 2**22),
              st.integers(1, 2**22)),
    st.builds(ProcEvent, st.just("comm"), st.integers(1, 2**22), st.integers(1, 2**22),
              st.just(0), st.text(alphabet="abc) (\n/-", max_size=15)),
)


@given(st.lists(EVENTS, max_size=8))
def test_proc_events_round_trip(events):
    data = b"".join(encode_proc_event(e, i) for i, e in enumerate(events))
    assert parse_proc_events(data) == (events, 0)


def test_comm_event_with_invalid_utf8_does_not_raise():
    good = encode_proc_event(ProcEvent("comm", 5, 5, comm="abcdef"))
    raw = good.replace(b"abcdef", b"\xff\xfe\x80ok!")  # same length
    (event,), bad = parse_proc_events(raw)
    assert event.comm == "\\xff\\xfe\\x80ok!" and bad == 0


@given(st.binary(max_size=300))
def test_hostile_bytes_never_raise(data):
    events, bad = parse_proc_events(data)
    assert bad >= 0 and all(isinstance(e, ProcEvent) for e in events)


def test_truncated_and_unknown_messages_are_counted():
    fork = encode_proc_event(ProcEvent("fork", 7, 7, parent_tid=1))
    assert parse_proc_events(fork[:-8]) == ([], 1)  # length says more than arrived
    short = bytearray(fork[:56])
    struct.pack_into("=I", short, 0, 56)
    assert parse_proc_events(bytes(short)) == ([], 1)  # fork body cut short
    uid = bytearray(fork)
    struct.pack_into("=I", uid, 36, 0x4)  # PROC_EVENT_UID: not ours, silently ignored
    assert parse_proc_events(bytes(uid)) == ([], 0)
