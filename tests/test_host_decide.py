"""The host peer's decision core and co-location avoidance (pure functions)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from guestagent.host.colocation import assign_pcpus
from guestagent.host.config import HostLimits
from guestagent.host.decide import GuestInput, Lease, decide, initial_plan
from guestagent.host.settings import ThreadSettings
from guestagent.protocol.model import AppliedFlag, PeerState, Request, SchedClass, VcpuHint

CPUS = frozenset({0, 1, 2, 3})
ORIG = ThreadSettings(policy=0, rt_priority=0, nice=0, affinity=CPUS)
LIMITS = HostLimits(max_rt_priority=40, max_boosted=2, heartbeat_period=1.0,
                    lease_periods=1.5, min_change_interval=0.1)


def originals(n=4, **kw):
    return {i: replace(ORIG, **kw) for i in range(n)}


def running(*hints, heard=100.0):
    return GuestInput(PeerState.RUNNING, tuple(hints), heard)


def fifo(vcpu, prio, group=0):
    return VcpuHint(vcpu, Request.BOOST, SchedClass.FIFO, rt_priority=prio, group=group)


def run(guest, orig=None, limits=LIMITS, now=100.5, previous=None, pins=CPUS):
    orig = orig if orig is not None else originals()
    return decide(guest, orig, limits, pins, previous or initial_plan(orig), now)


def test_boost_grants_requested_rt_priority_within_cap():
    plan = run(running(fifo(1, 30)))
    assert plan.lease == Lease.HELD
    assert plan.vcpus[1].settings == replace(ORIG, policy=1, rt_priority=30)
    assert plan.vcpus[1].applied == AppliedFlag.BOOSTED
    assert plan.vcpus[0].settings == ORIG and plan.vcpus[0].applied == AppliedFlag.NONE


def test_fifo_99_is_clamped_to_the_cap():
    plan = run(running(fifo(0, 99)))
    assert plan.vcpus[0].settings.rt_priority == 40
    assert plan.vcpus[0].applied == AppliedFlag.BOOSTED | AppliedFlag.CLAMPED


def test_deadline_and_withheld_policies_fall_back_to_an_allowed_one():
    hint = VcpuHint(0, Request.BOOST, SchedClass.DEADLINE, rt_priority=10)
    plan = run(running(hint))
    assert plan.vcpus[0].settings.policy == 1
    assert plan.vcpus[0].applied & AppliedFlag.CLAMPED
    rr = VcpuHint(0, Request.BOOST, SchedClass.RR, rt_priority=10)
    plan = run(running(rr), limits=replace(LIMITS, rt_policies=(1,)))
    assert plan.vcpus[0].settings.policy == 1
    assert plan.vcpus[0].applied == AppliedFlag.BOOSTED | AppliedFlag.CLAMPED


def test_no_rt_policy_allowed_falls_back_to_nice_floor():
    plan = run(running(fifo(0, 10)), limits=replace(LIMITS, rt_policies=(), nice_floor=-5))
    assert plan.vcpus[0].settings == replace(ORIG, nice=-5)
    assert plan.vcpus[0].applied == AppliedFlag.BOOSTED | AppliedFlag.CLAMPED


def test_boost_cap_denies_lowest_priority_deterministically():
    hints = [fifo(0, 10), fifo(1, 30), fifo(2, 20), fifo(3, 30)]
    for order in (hints, hints[::-1]):
        plan = run(running(*order))
        boosted = {v for v, p in plan.vcpus.items() if p.applied & AppliedFlag.BOOSTED}
        denied = {v for v, p in plan.vcpus.items() if p.applied & AppliedFlag.DENIED}
        assert boosted == {1, 3} and denied == {0, 2}
        assert plan.vcpus[0].settings == ORIG


def test_nice_boost_and_floor():
    hint = VcpuHint(2, Request.BOOST, SchedClass.OTHER, nice=-20)
    plan = run(running(hint))
    assert plan.vcpus[2].settings.nice == -10
    assert plan.vcpus[2].applied == AppliedFlag.BOOSTED | AppliedFlag.CLAMPED
    plan = run(running(hint), limits=replace(LIMITS, honour_nice=False))
    assert plan.vcpus[2].applied == AppliedFlag.DENIED and plan.vcpus[2].settings == ORIG


def test_unboost_raises_nice_unless_disabled_or_thread_is_rt():
    hint = VcpuHint(1, Request.UNBOOST)
    plan = run(running(hint))
    assert plan.vcpus[1].settings.nice == 10 and plan.vcpus[1].applied == AppliedFlag.THROTTLED
    plan = run(running(replace(hint, nice=15)))
    assert plan.vcpus[1].settings.nice == 15
    plan = run(running(hint), limits=replace(LIMITS, honour_unboost=False))
    assert plan.vcpus[1].applied == AppliedFlag.DENIED
    plan = run(running(hint), orig=originals(policy=1, rt_priority=5))
    assert plan.vcpus[1].applied == AppliedFlag.DENIED
    assert plan.vcpus[1].settings.rt_priority == 5


def test_unknown_and_duplicate_vcpus_are_rejected_not_applied():
    plan = run(running(fifo(7, 10), fifo(-1, 10), fifo(0, 10), fifo(0, 40)))
    assert plan.rejected == 3
    assert set(plan.vcpus) == {0, 1, 2, 3}
    assert plan.vcpus[0].settings.rt_priority == 10


def test_lease_expires_and_reverts_within_two_heartbeats():
    boosted = run(running(fifo(0, 30), heard=100.0), now=100.2)
    assert boosted.lease == Lease.HELD and boosted.next_deadline == 101.5
    quiet = run(running(fifo(0, 30), heard=100.0), now=101.5, previous=boosted)
    assert quiet.lease == Lease.EXPIRED
    assert quiet.vcpus[0].settings == ORIG and quiet.vcpus[0].applied == AppliedFlag.NONE
    assert quiet.next_deadline is None


def test_stopping_or_absent_guest_reverts_at_once():
    boosted = run(running(fifo(0, 30)))
    for state in (PeerState.STOPPING, PeerState.ABSENT, PeerState.STARTING):
        plan = run(GuestInput(state, (fifo(0, 30),), 100.4), previous=boosted)
        assert plan.lease == Lease.EXPIRED
        assert plan.vcpus[0].settings == ORIG


def test_flood_is_rate_limited_but_revert_is_immediate():
    a = run(running(fifo(0, 10)), now=100.0)
    b = run(running(fifo(0, 20)), now=100.05, previous=a)
    assert b.vcpus[0].settings.rt_priority == 10 and b.rate_limited == 1
    assert b.next_deadline == 100.1
    c = run(running(fifo(0, 20)), now=100.1, previous=b)
    assert c.vcpus[0].settings.rt_priority == 20
    d = run(running(), now=100.12, previous=c)
    assert d.vcpus[0].settings == ORIG and d.rate_limited == 0


def test_group_members_pinned_to_distinct_pcpus_and_reported():
    hints = [fifo(0, 10, group=1), VcpuHint(1, group=1), VcpuHint(2, group=2)]
    plan = run(running(*hints))
    a, b = plan.vcpus[0].settings.affinity, plan.vcpus[1].settings.affinity
    assert len(a) == len(b) == 1 and a != b
    assert plan.vcpus[0].applied == AppliedFlag.BOOSTED | AppliedFlag.PINNED
    assert plan.vcpus[1].applied == AppliedFlag.PINNED
    assert plan.vcpus[2].settings.affinity == CPUS  # a lone member needs no pin
    # The pins stay put when nothing changes.
    again = run(running(*hints), previous=plan, now=101.0)
    assert again.vcpus[0].settings.affinity == a and again.vcpus[1].settings.affinity == b


def test_group_larger_than_allowed_cpus_is_colocated_best_effort():
    hints = [VcpuHint(v, group=3) for v in range(3)]
    plan = run(running(*hints), pins=frozenset({0, 1}))
    flags = [plan.vcpus[v].applied for v in range(3)]
    assert flags.count(AppliedFlag.PINNED) == 2 and flags.count(AppliedFlag.COLOCATED) == 1
    assert plan.vcpus[2].settings.affinity == CPUS


def test_colocation_respects_operator_affinity():
    orig = originals()
    orig[0] = replace(ORIG, affinity=frozenset({2}))
    orig[1] = replace(ORIG, affinity=frozenset({2}))
    plan = run(running(VcpuHint(0, group=5), VcpuHint(1, group=5)), orig=orig)
    assert {plan.vcpus[0].applied, plan.vcpus[1].applied} == {
        AppliedFlag.PINNED, AppliedFlag.COLOCATED}
    assert all(p.settings.affinity == frozenset({2}) for p in plan.vcpus.values() if p.vcpu < 2)


def test_assign_pcpus_prefers_constrained_vcpus_first():
    pins, colocated = assign_pcpus(
        {0: 1, 1: 1}, {0: frozenset({0, 1}), 1: frozenset({0})}, {})
    assert pins == {0: 1, 1: 0} and not colocated


hostile_hints = st.builds(
    VcpuHint,
    vcpu=st.integers(-5, 40),
    request=st.sampled_from(list(Request)),
    sched_class=st.sampled_from(list(SchedClass)),
    rt_priority=st.integers(-1000, 1000),
    nice=st.integers(-1000, 1000),
    group=st.integers(0, 3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile_hints, max_size=12), st.floats(99.0, 103.0))
def test_any_hints_stay_within_limits(hints, now):
    plan = run(running(*hints), now=now)
    rt = [p for p in plan.vcpus.values() if p.settings.is_rt]
    assert len([p for p in plan.vcpus.values() if p.applied & AppliedFlag.BOOSTED]) <= 2
    assert all(1 <= p.settings.rt_priority <= 40 for p in rt)
    assert all(-10 <= p.settings.nice <= 19 for p in plan.vcpus.values())
    assert all(p.settings.affinity <= CPUS and p.settings.affinity for p in plan.vcpus.values())
    assert set(plan.vcpus) == {0, 1, 2, 3}
    if now >= 101.5:
        assert all(p.settings == ORIG for p in plan.vcpus.values())
