"""Opt-in steering as pure functions over snapshots, capacity and simulated time."""

from __future__ import annotations

from helpers.snapshots import cpus, snap, thread

from guestagent.agent.config import parse_config
from guestagent.agent.steer import SteerState, capacity_from_steal, own_cpus, plan, restores
from guestagent.protocol.model import Request, VcpuHint

STEER = parse_config(b"[steering]\nenabled=true\nhysteresis=100\nmin_dwell_ms=5000\n"
                     b"[[rule]]\nname='audio'\ncomm='pw-*'\nsteer=true\n"
                     b"[[rule]]\nname='other'\ncomm='x-*'\n")


def pw(affinity=(0, 1, 2, 3), tid=10, last=0):
    return thread(tid, comm="pw-data", cpus=affinity, last=last)


def test_moves_to_the_vcpus_within_hysteresis_of_the_best():
    caps = {0: 300, 1: 1000, 2: 950, 3: 500}
    moves, state = plan(snap([pw()], cpu_state=cpus(4)), STEER, caps, SteerState(), 0.0)
    assert [(m.tid, set(m.affinity)) for m in moves] == [(10, {1, 2})]
    assert state.steered[10].original == frozenset({0, 1, 2, 3})
    assert "rule audio" in moves[0].reason


def test_only_rules_with_steer_and_only_when_enabled():
    caps = {0: 100, 1: 1000}
    x = thread(11, comm="x-1", cpus=(0, 1))
    assert plan(snap([x]), STEER, caps, SteerState(), 0.0)[0] == []
    off = parse_config(b"[[rule]]\nname='audio'\ncomm='pw-*'\nsteer=true\n")
    assert plan(snap([pw((0, 1))]), off, caps, SteerState(), 0.0)[0] == []


def test_never_outside_what_the_task_was_allowed():
    caps = {0: 1000, 1: 100, 2: 400, 3: 1024}
    moves, _ = plan(snap([pw((1, 2))], cpu_state=cpus(4)), STEER, caps, SteerState(), 0.0)
    assert set(moves[0].affinity) == {2}


def test_isolated_cpus_are_avoided_unless_the_rule_allows_them():
    caps = {0: 100, 1: 1000}
    state = cpus(2, isolated=(1,))
    assert plan(snap([pw((0, 1))], cpu_state=state), STEER, caps, SteerState(), 0.0)[0] == []
    allow = parse_config(b"[steering]\nenabled=true\n[[rule]]\nname='a'\ncomm='pw-*'\n"
                         b"steer=true\nallow_isolated=true\n")
    moves, _ = plan(snap([pw((0, 1))], cpu_state=state), allow, caps, SteerState(), 0.0)
    assert set(moves[0].affinity) == {1}


def test_hysteresis_and_dwell_prevent_flapping():
    moves, state = plan(snap([pw((0, 1))]), STEER, {0: 1000, 1: 400}, SteerState(), 0.0)
    assert set(moves[0].affinity) == {0}
    now_on_0 = pw((0,))
    # Capacity swaps, but the task moved less than the dwell time ago.
    moves, state = plan(snap([now_on_0]), STEER, {0: 400, 1: 1000}, state, 1.0)
    assert moves == []
    # A small advantage is not worth a move, even after the dwell time.
    moves, state = plan(snap([now_on_0]), STEER, {0: 950, 1: 1000}, state, 10.0)
    assert moves == []
    moves, state = plan(snap([now_on_0]), STEER, {0: 400, 1: 1000}, state, 10.0)
    assert set(moves[0].affinity) == {1}, "the original affinity {0, 1} still bounds it"


def test_affinity_changed_by_someone_else_is_adopted_not_undone():
    _, state = plan(snap([pw((0, 1))]), STEER, {0: 1000, 1: 100}, SteerState(), 0.0)
    admin_moved = pw((1,))
    moves, state = plan(snap([admin_moved]), STEER, {0: 1000, 1: 100}, state, 10.0)
    assert moves == [], "only CPU 1 is allowed now"
    assert 10 not in state.steered


def test_steering_ended_by_reload_restores_the_original_affinity():
    _, state = plan(snap([pw((0, 1))]), STEER, {0: 1000, 1: 100}, SteerState(), 0.0)
    plain = parse_config(b"[steering]\nenabled=false\n")
    moves, state = plan(snap([pw((0,))]), plain, {0: 1000, 1: 100}, state, 1.0)
    assert [(m.tid, set(m.affinity)) for m in moves] == [(10, {0, 1})]
    assert state.steered == {}


def test_restores_lists_every_steered_task():
    _, state = plan(snap([pw((0, 1)), pw((0, 1), tid=12)]), STEER, {0: 1000, 1: 100},
                    SteerState(), 0.0)
    assert sorted(restores(state)) == [(10, frozenset({0, 1})), (12, frozenset({0, 1}))]


def test_without_host_capacity_steal_time_estimates_it():
    caps = capacity_from_steal({0: 0.5, 1: 0.0, 2: 2.0}, frozenset({0, 1, 2}))
    assert caps == {0: 512, 1: 1024, 2: 0}
    state = cpus(2)
    state = type(state)(**{**state.__dict__, "steal": {0: 0.6, 1: 0.0}})
    moves, _ = plan(snap([pw((0, 1))], cpu_state=state), STEER, None, SteerState(), 0.0)
    assert set(moves[0].affinity) == {1}


def _hints(*requests: Request) -> list[VcpuHint]:
    return [VcpuHint(vcpu=v, request=r) for v, r in enumerate(requests)]


def test_the_agent_stays_off_the_vcpus_it_unboosts():
    every = frozenset({0, 1, 2, 3})
    lowered = _hints(Request.UNBOOST, Request.BOOST, Request.NEUTRAL, Request.UNBOOST)
    assert own_cpus(every, lowered, every) == {1, 2}
    assert own_cpus(frozenset({0, 1}), lowered, every) == {1}, "within its own affinity"
    assert own_cpus(every, lowered, frozenset({0, 1, 3})) == {1}, "online only"
    assert own_cpus(every, _hints(*[Request.NEUTRAL] * 4), every) == every


def test_the_agent_keeps_its_cpus_when_every_one_it_may_use_is_unboosted():
    # An admin who pinned the agent to vCPU 0 (CPUAffinity=0) keeps it there.
    lowered = _hints(Request.UNBOOST, Request.NEUTRAL)
    assert own_cpus(frozenset({0}), lowered, frozenset({0, 1})) == {0}
    assert own_cpus(frozenset({0, 1}), _hints(Request.UNBOOST, Request.UNBOOST),
                    frozenset({0, 1})) == {0, 1}
