"""The host-wide arbiter: caps per CPU, per host, per VM; boost budgets (pure)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestagent.host.arbiter import (
    EMULATOR,
    NS,
    ArbiterLimits,
    BoostRequest,
    Budget,
    ThreadKey,
    Verdict,
    account,
    arbitrate,
    forget_vm,
    fresh_budget,
)

CPUS = frozenset({0, 1, 2, 3})
LIMITS = ArbiterLimits(per_cpu=1, host=4, per_vm=2, budget=0.5)


def req(vm, index, prio=10, cpus=CPUS):
    return BoostRequest(ThreadKey(vm, index), prio, frozenset(cpus))


def granted(arb):
    return sorted(k for k, v in arb.verdicts.items() if v == Verdict.GRANTED)


def test_defaults_derive_from_the_cpus():
    lim = ArbiterLimits().resolved(frozenset({0, 1}))
    assert (lim.host, lim.per_vm) == (2, 1)
    lim = ArbiterLimits(per_cpu=2).resolved(frozenset(range(8)))
    assert (lim.host, lim.per_vm) == (16, 8)
    assert ArbiterLimits().resolved(frozenset()).host == 1


def test_per_vm_share_keeps_one_vm_from_taking_every_slot():
    arb = arbitrate([req("a", i) for i in range(4)] + [req("b", 0)], (), {}, {}, CPUS,
                    LIMITS, 0.0)
    assert granted(arb) == [ThreadKey("a", 0), ThreadKey("a", 1), ThreadKey("b", 0)]
    assert arb.verdicts[ThreadKey("a", 2)] == Verdict.VM_SHARE


def test_host_cap():
    lim = ArbiterLimits(per_cpu=1, host=2, per_vm=2)
    arb = arbitrate([req("a", 0), req("b", 0), req("c", 0, prio=30)], (), {}, {}, CPUS,
                    lim, 0.0)
    # Higher priority first among new requests; "a" before "b" on a tie.
    assert granted(arb) == [ThreadKey("a", 0), ThreadKey("c", 0)]
    assert arb.verdicts[ThreadKey("b", 0)] == Verdict.HOST_CAP


def test_held_grants_keep_their_place_against_louder_requests():
    lim = ArbiterLimits(per_cpu=1, host=1, per_vm=1)
    arb = arbitrate([req("a", 0, prio=1), req("b", 0, prio=99)], [ThreadKey("a", 0)],
                    {}, {}, CPUS, lim, 0.0)
    assert granted(arb) == [ThreadKey("a", 0)]


def test_per_cpu_cap_follows_affinity():
    # Two threads that may only run on CPU 0: one slot.
    arb = arbitrate([req("a", 0, cpus={0}), req("b", 0, cpus={0})], (), {}, {}, CPUS,
                    LIMITS, 0.0)
    assert granted(arb) == [ThreadKey("a", 0)]
    assert arb.verdicts[ThreadKey("b", 0)] == Verdict.CPU_CAP
    # A thread free to run anywhere makes room for a pinned one (augmenting path).
    arb = arbitrate([req("a", 0, cpus={0, 1}), req("b", 0, cpus={0}), req("c", 0, cpus={1})],
                    (), {}, {}, CPUS, LIMITS, 0.0)
    assert arb.verdicts[ThreadKey("c", 0)] == Verdict.CPU_CAP  # {0,1} for two of three
    assert set(arb.cpus.values()) == {0, 1}
    arb = arbitrate([req("a", 0, cpus={0, 1}), req("b", 0, cpus={0})], (), {}, {}, CPUS,
                    LIMITS, 0.0)
    assert arb.cpus == {ThreadKey("a", 0): 1, ThreadKey("b", 0): 0}


def test_affinity_outside_the_host_cpus_gets_no_slot():
    arb = arbitrate([req("a", 0, cpus={7})], (), {}, {}, CPUS, LIMITS, 0.0)
    assert arb.verdicts[ThreadKey("a", 0)] == Verdict.CPU_CAP


def test_emulator_rides_with_a_vcpu_inside_the_caps():
    lim = ArbiterLimits(per_cpu=1, host=2, per_vm=1)
    arb = arbitrate([req("a", EMULATOR), req("a", 0), req("b", 0), req("b", EMULATOR)],
                    (), {}, {}, CPUS, lim, 0.0)
    # The emulator right behind its VM's first vCPU: a0 and a's emulator fill the host.
    assert granted(arb) == [ThreadKey("a", EMULATOR), ThreadKey("a", 0)]
    assert arb.verdicts[ThreadKey("b", 0)] == Verdict.HOST_CAP
    assert arb.verdicts[ThreadKey("b", EMULATOR)] == Verdict.NO_VCPU
    arb = arbitrate([req("a", EMULATOR), req("a", 0)], (), {}, {}, CPUS, lim, 0.0)
    assert granted(arb) == [ThreadKey("a", EMULATOR), ThreadKey("a", 0)]
    arb = arbitrate([req("a", EMULATOR)], (), {}, {}, CPUS, lim, 0.0)
    assert arb.verdicts[ThreadKey("a", EMULATOR)] == Verdict.NO_VCPU


def test_emulator_does_not_count_against_the_vm_share():
    lim = ArbiterLimits(per_cpu=1, host=4, per_vm=1)
    arb = arbitrate([req("a", 0), req("a", EMULATOR), req("b", 0)], (), {}, {}, CPUS, lim,
                    0.0)
    assert len(granted(arb)) == 3


def test_budget_spends_run_time_not_wall_time():
    lim = ArbiterLimits(budget=0.5)
    b = Budget(0.4, 0.0, run_ns=0, boosted=True)
    # One second boosted, 100 ms of it running: a mostly-sleeping vCPU spends little,
    # and earns half of the second meanwhile, up to the budget.
    b = account(b, int(0.1 * NS), 1.0, lim)
    assert b.remaining == 0.5 and not b.spent
    assert b.boosted_seconds == 1.0
    b = account(Budget(0.5, 0.0, run_ns=0, boosted=True), int(0.3 * NS), 0.4, lim)
    assert abs(b.remaining - 0.4) < 1e-9  # ran 0.3, earned 0.2


def test_budget_runs_out_and_is_earned_back_at_the_share():
    lim = ArbiterLimits(budget=0.5, share=0.5)
    b = Budget(0.5, 0.0, run_ns=0, boosted=True)
    b = account(b, int(1.0 * NS), 1.0, lim)  # a spinner: spends 1, earns 0.5
    assert b.spent and b.remaining == 0.0 and b.exhaustions == 1
    b = account(Budget(**{**b.__dict__, "boosted": False}), int(1.5 * NS), 1.6, lim)
    assert b.spent and abs(b.remaining - 0.3) < 1e-9  # 600 ms unboosted: 300 ms back
    b = account(b, int(1.9 * NS), 2.1, lim)
    assert not b.spent and b.remaining == 0.5  # full again, never above the budget
    assert b.exhaustions == 1


@pytest.mark.parametrize("f", [0.1, 0.3, 0.5, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("share", [0.25, 0.5, 0.9])
def test_a_thread_is_held_to_its_share_and_keeps_its_boost_below_it(f, share):
    """Rounds of 10 ms for 200 s by the arbiter's own deadlines, the thread running a share
    f of its time: RT run time stays within share * T + budget; below the share it is
    never cut, above it it is boosted share/f of the time."""
    key = ThreadKey("a", 0)
    lim = ArbiterLimits(per_cpu=1, host=4, per_vm=4, budget=0.5, share=share)
    now, run, rt_run, boosted_time, budgets, held = 0.0, 0, 0.0, 0.0, {}, frozenset()
    while now < 200.0:
        arb = arbitrate([req("a", 0)], held, budgets, {key: run}, CPUS, lim, now)
        budgets, held = arb.budgets, frozenset(k for k in arb.verdicts if arb.granted(k))
        step = min(0.01, arb.next_deadline - now) if arb.next_deadline else 0.01
        run += int(f * step * NS)
        if key in held:
            rt_run += f * step
            boosted_time += step
        now += step
    assert rt_run <= share * now + lim.budget + 1e-6
    if f <= share:
        assert boosted_time == pytest.approx(now)
    else:
        assert boosted_time / now == pytest.approx(share / f, abs=0.02)


def test_unknown_run_time_spends_wall_time():
    lim = ArbiterLimits(budget=0.5, share=0.5)
    b = account(Budget(0.5, 0.0, None, boosted=True), None, 0.2, lim)
    assert abs(b.remaining - 0.4) < 1e-9


def test_run_time_going_backwards_spends_nothing():
    lim = ArbiterLimits(budget=0.5)
    b = account(Budget(0.5, 0.0, 10 * NS, boosted=True), 5 * NS, 0.2, lim)
    assert b.remaining == 0.5


def test_spent_budget_withholds_and_says_when_to_look_again():
    key = ThreadKey("a", 0)
    lim = ArbiterLimits(per_cpu=1, host=4, per_vm=4, budget=0.5, share=0.5)
    arb = arbitrate([req("a", 0)], (), {}, {key: 0}, CPUS, lim, 0.0)
    # Running flat out it spends 1 and earns 0.5 a second: dry after 1 s.
    assert arb.granted(key) and arb.next_deadline == 1.0
    arb = arbitrate([req("a", 0)], [key], arb.budgets, {key: NS}, CPUS, lim, 1.0)
    assert arb.verdicts[key] == Verdict.SPENT
    assert arb.next_deadline == 2.0  # earned back at half a second per second
    arb = arbitrate([req("a", 0)], (), arb.budgets, {key: NS}, CPUS, lim, 2.0)
    assert arb.granted(key)


def test_a_share_of_one_never_runs_dry():
    key = ThreadKey("a", 0)
    lim = ArbiterLimits(per_cpu=1, host=4, per_vm=4, budget=0.5, share=1.0)
    arb = arbitrate([req("a", 0)], (), {}, {key: 0}, CPUS, lim, 0.0)
    assert arb.granted(key) and arb.next_deadline is None
    arb = arbitrate([req("a", 0)], [key], arb.budgets, {key: 10 * NS}, CPUS, lim, 10.0)
    assert arb.granted(key)


def test_spent_slot_goes_to_the_next_in_line():
    lim = ArbiterLimits(per_cpu=1, host=1, per_vm=1, budget=0.5)
    a, b = ThreadKey("a", 0), ThreadKey("b", 0)
    arb = arbitrate([req("a", 0), req("b", 0)], (), {}, {a: 0, b: 0}, CPUS, lim, 0.0)
    assert granted(arb) == [a]
    arb = arbitrate([req("a", 0), req("b", 0)], [a], arb.budgets, {a: NS, b: 0}, CPUS, lim,
                    0.5)
    assert granted(arb) == [b] and arb.verdicts[a] == Verdict.SPENT


def test_no_request_no_deadline_and_forget_vm():
    arb = arbitrate([], (), {}, {}, CPUS, LIMITS, 0.0)
    assert arb.next_deadline is None and not arb.verdicts
    budgets = {ThreadKey("a", 0): fresh_budget(LIMITS, 0.0), ThreadKey("b", 0):
               fresh_budget(LIMITS, 0.0)}
    assert list(forget_vm(budgets, "a")) == [ThreadKey("b", 0)]


VMS = st.sampled_from(["a", "b", "c"])
REQUEST = st.builds(req, VMS, st.integers(-1, 5), st.integers(0, 99),
                    st.frozensets(st.integers(0, 5), min_size=1, max_size=4))


@settings(max_examples=60, deadline=None)
@given(rounds=st.lists(st.tuples(st.lists(REQUEST, max_size=12), st.floats(0.0, 0.3),
                                 st.floats(0.0, 1.0)), min_size=1, max_size=12),
       per_cpu=st.integers(1, 2), host=st.integers(0, 6), per_vm=st.integers(0, 3))
def test_hostile_rounds_never_break_a_cap_or_the_budget(rounds, per_cpu, host, per_vm):
    """Whatever is asked, round after round: every cap holds, and no thread that is looked
    at again by the deadline runs boosted beyond its budget plus its share of the time."""
    lim = ArbiterLimits(per_cpu=per_cpu, host=host, per_vm=per_vm, budget=0.5)
    cpus = frozenset({0, 1, 2})
    now, budgets, held = 0.0, {}, frozenset()
    run: Counter = Counter()
    boosted_run: Counter = Counter()
    for requests, step, busy in rounds:
        arb = arbitrate(requests, held, budgets, dict(run), cpus, lim, now)
        grants = [k for k, v in arb.verdicts.items() if v == Verdict.GRANTED]
        assert len(grants) <= host
        assert all(n <= per_vm for n in Counter(k.vm for k in grants
                                                if k.index != EMULATOR).values())
        assert all(Counter(arb.cpus.values())[c] <= per_cpu for c in cpus)
        assert set(arb.cpus) == set(grants)
        for k in grants:
            assert arb.cpus[k] in next(r.cpus for r in requests if r.key == k)  # first stands
            if k.index == EMULATOR:
                assert any(g.vm == k.vm and g.index != EMULATOR for g in grants)
        for k, b in arb.budgets.items():
            assert 0.0 <= b.remaining <= lim.budget
            assert boosted_run[k] <= lim.budget + lim.share * now + 1e-6
        held = frozenset(grants)
        budgets = arb.budgets
        if arb.next_deadline is not None:  # the caller's contract: look again by then
            step = min(step, arb.next_deadline - now)
        for k in budgets:  # every thread runs `busy` of the step, boosted or not
            ran = busy * step
            run[k] += int(ran * NS)
            if k in held:
                boosted_run[k] += ran
        now += step
