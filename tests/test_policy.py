"""The hint policy as pure functions over hand-built snapshots and simulated time."""

from __future__ import annotations

from helpers.snapshots import BATCH, DL, FIFO, OTHER, RR, cpus, irq, snap, thread

from guestagent.agent.config import parse_config
from guestagent.agent.policy import PolicyState, decide, strength, wanted_hints
from guestagent.observe.parse import PF_KTHREAD, PF_NO_SETAFFINITY
from guestagent.protocol.model import HintFlag, Request, VcpuHint

CONFIG = parse_config(b"")


def hints_of(s, config=CONFIG):
    return {v: w.hint for v, w in wanted_hints(s, config).items()}


def test_no_work_means_neutral_hints_for_every_vcpu():
    assert hints_of(snap(cpu_state=cpus(4))) == {v: VcpuHint(vcpu=v) for v in range(4)}


def test_pinned_fifo_thread_boosts_its_vcpu_with_its_priority():
    h = hints_of(snap([thread(10, FIFO, 80, cpus=(1,), last=1)]))
    assert h[0] == VcpuHint(vcpu=0)
    assert h[1].request is Request.BOOST
    assert (h[1].sched_class, h[1].rt_priority) == (FIFO, 80)
    assert h[1].flags & HintFlag.PINNED_CRITICAL


def test_highest_need_wins_and_reasons_name_every_thread():
    w = wanted_hints(snap([thread(10, FIFO, 20, cpus=(0,)), thread(11, RR, 60, cpus=(0,)),
                           thread(12, OTHER, nice=-5, cpus=(0,), comm="x")]), CONFIG)[0]
    assert (w.hint.sched_class, w.hint.rt_priority) == (RR, 60)
    assert any("t10[10]" in r for r in w.reasons) and any("t11[11]" in r for r in w.reasons)


def test_deadline_outranks_fifo_99():
    dl = thread(10, DL, cpus=(0,))
    w = hints_of(snap([dl, thread(11, FIFO, 99, cpus=(0,))]))[0]
    assert w.sched_class is DL and w.rt_priority == 99
    assert strength(w) > strength(VcpuHint(0, Request.BOOST, FIFO, 99))


def test_floating_rt_counts_where_it_last_ran_by_default():
    s = snap([thread(10, FIFO, 50, cpus=(0, 1), last=1)])
    h = hints_of(s)
    assert h[0].request is Request.NEUTRAL
    assert h[1].request is Request.BOOST and not h[1].flags & HintFlag.PINNED_CRITICAL


def test_floating_rt_modes_all_and_ignore():
    s = snap([thread(10, FIFO, 50, cpus=(0, 1), last=1)])
    every = hints_of(s, parse_config(b"[policy]\nfloating_rt='all'\n"))
    assert every[0].request is every[1].request is Request.BOOST
    none = hints_of(s, parse_config(b"[policy]\nfloating_rt='ignore'\n"))
    assert none[0].request is none[1].request is Request.NEUTRAL


def test_affinity_to_offline_cpus_only_counts_the_online_ones():
    s = snap([thread(10, FIFO, 50, cpus=(1, 2), last=2)], cpu_state=cpus(3, online=(0, 1)))
    h = hints_of(s)
    assert h[1].request is Request.BOOST and h[1].flags & HintFlag.PINNED_CRITICAL
    assert h[2].request is Request.NEUTRAL


def test_kernel_housekeeping_threads_are_ignored():
    migration = thread(3, FIFO, 99, cpus=(0,), comm="migration/0",
                       flags=PF_KTHREAD | PF_NO_SETAFFINITY)
    assert hints_of(snap([migration]))[0] == VcpuHint(vcpu=0)


def test_active_threaded_irq_boosts_the_vcpu_of_its_effective_affinity():
    kthread = thread(99, FIFO, 50, cpus=(1,), comm="irq/33-eth0-Tx", flags=PF_KTHREAD)
    h = hints_of(snap(irqs=[irq(33, cpu=1, threads=(kthread,))]))
    assert (h[1].request, h[1].sched_class, h[1].rt_priority) == (Request.BOOST, FIFO, 50)
    quiet = hints_of(snap(irqs=[irq(33, cpu=1, rate=0.0, threads=(kthread,))]))
    assert quiet[1].request is Request.NEUTRAL, "an IRQ with no interrupts has no work"
    off = hints_of(snap(irqs=[irq(33, cpu=1, threads=(kthread,))]),
                   parse_config(b"[policy]\nthreaded_irqs=false\n"))
    assert off[1].request is Request.NEUTRAL


def test_critical_irqs_by_pattern_netdev_and_rate_flag_and_group_their_vcpus():
    irqs = [irq(30, cpu=0, actions=("nvme0q1",)), irq(31, cpu=1, netdevs=("eth1",), rate=5)]
    config = parse_config(b"[policy]\ncritical_irqs=['nvme0q*']\ncritical_netdevs=['eth1']\n")
    h = hints_of(snap(irqs=irqs, cpu_state=cpus(3)), config)
    assert h[0].flags & HintFlag.CRITICAL_IRQ and h[1].flags & HintFlag.CRITICAL_IRQ
    assert h[0].group == h[1].group != 0 and h[2].group == 0
    rate = parse_config(b"[policy]\ncritical_irq_rate=1000\n")
    h = hints_of(snap(irqs=[irq(30, cpu=0, rate=5000), irq(31, cpu=1, rate=10)]), rate)
    assert h[0].flags & HintFlag.CRITICAL_IRQ and not h[1].flags & HintFlag.CRITICAL_IRQ
    assert h[0].group == 0, "a group of one says nothing"


def test_rules_mark_tasks_latency_sensitive_with_their_class():
    config = parse_config(b"[[rule]]\nname='audio'\nunit='pipewire.service'\nsched='rr'\n"
                          b"priority=70\n[[rule]]\nname='ui'\ncomm='ui-*'\nsched='other'\n"
                          b"nice=-10\n")
    pw = thread(20, OTHER, cpus=(0,), cgroup="/user.slice/pipewire.service", comm="pw")
    ui = thread(21, OTHER, cpus=(0, 1), last=1, comm="ui-main")
    w = wanted_hints(snap([pw, ui]), config)
    assert (w[0].hint.sched_class, w[0].hint.rt_priority) == (RR, 70)
    assert w[0].hint.flags & HintFlag.LATENCY_SLEEPER
    assert any("rule audio" in r for r in w[0].reasons)
    assert (w[1].hint.request, w[1].hint.sched_class, w[1].hint.nice) == (
        Request.BOOST, OTHER, -10)


def test_rule_never_lowers_a_threads_own_rt_priority():
    config = parse_config(b"[[rule]]\nname='a'\ncomm='x'\nsched='fifo'\npriority=10\n")
    h = hints_of(snap([thread(1, FIFO, 60, cpus=(0,), comm="x")]), config)
    assert h[0].rt_priority == 60


def test_rule_asking_more_than_the_thread_has_wins():
    config = parse_config(b"[[rule]]\nname='a'\ncomm='x'\nsched='fifo'\npriority=90\n")
    h = hints_of(snap([thread(1, FIFO, 60, cpus=(0,), comm="x")]), config)
    assert (h[0].sched_class, h[0].rt_priority) == (FIFO, 90)
    dl = parse_config(b"[[rule]]\nname='a'\ncomm='x'\nsched='deadline'\n")
    h = hints_of(snap([thread(1, RR, 95, cpus=(0,), comm="x")]), dl)
    assert (h[0].sched_class, h[0].rt_priority) == (DL, 99), "DEADLINE outranks any RT"


def test_unboost_when_only_low_priority_work_runs():
    batch = thread(30, BATCH, cpus=(0, 1), last=1)
    s = snap([batch], cpu_state=cpus(busy={0: 0.5, 1: 0.9}, lowprio={0: 0.1, 1: 0.88}))
    w = wanted_hints(s, CONFIG)
    assert w[1].hint.request is Request.UNBOOST
    assert "t30[30]" in w[1].reasons[0]
    assert w[0].hint.request is Request.NEUTRAL, "vCPU 0 runs normal work too"
    off = hints_of(s, parse_config(b"[policy]\nunboost=false\n"))
    assert off[1].request is Request.NEUTRAL


def test_idle_vcpu_is_flagged_and_unboosted_only_when_asked():
    s = snap(cpu_state=cpus(busy={0: 0.0, 1: 0.5}))
    h = hints_of(s)
    assert h[0].flags & HintFlag.IDLE and h[0].request is Request.NEUTRAL
    h = hints_of(s, parse_config(b"[policy]\nunboost_idle=true\n"))
    assert h[0].request is Request.UNBOOST and h[1].request is Request.NEUTRAL


def test_no_usage_figures_yet_means_no_unboost():
    assert hints_of(snap(cpu_state=cpus(busy={}, lowprio={}))) == {
        0: VcpuHint(vcpu=0), 1: VcpuHint(vcpu=1)}


# -- hysteresis over simulated time --------------------------------------------

CFG = parse_config(b"[policy]\nhold_time_ms=2000\nmin_change_interval_ms=200\n")
RT = [thread(10, FIFO, 50, cpus=(1,), last=1)]


def run(timeline, config=CFG):
    """Feed (time, threads) steps through decide(); return vCPU 1's published hints."""
    state, out = PolicyState(), []
    for now, threads in timeline:
        decision, state = decide(snap(threads, at=now), config, state, now)
        out.append((now, decision.vcpus[1].hint.request, decision.changed))
    return out


def test_boost_is_immediate_and_unboost_waits_for_the_hold_time():
    steps = run([(0.0, []), (1.0, RT), (1.1, []), (2.0, []), (3.0, []), (3.1, []),
                 (3.2, [])])
    requests = [(t, r) for t, r, _ in steps]
    assert requests == [(0.0, Request.NEUTRAL), (1.0, Request.BOOST), (1.1, Request.BOOST),
                        (2.0, Request.BOOST), (3.0, Request.BOOST), (3.1, Request.NEUTRAL),
                        (3.2, Request.NEUTRAL)]
    assert [c for _, _, c in steps] == [True, True, False, False, False, True, False]


def test_need_returning_during_hold_cancels_the_unboost():
    steps = run([(0.0, RT), (1.0, []), (2.5, RT), (3.5, []), (5.0, []), (5.5, [])])
    assert [r for _, r, _ in steps] == [Request.BOOST] * 5 + [Request.NEUTRAL]


def test_flag_only_changes_are_rate_limited():
    crit = parse_config(b"[policy]\nmin_change_interval_ms=500\nhold_time_ms=0\n"
                        b"critical_irqs=['x']\n")
    hot = [irq(5, cpu=1, actions=("x",))]
    state, seen = PolicyState(), []
    for now, irqs in [(0.0, []), (0.1, hot), (0.4, hot), (0.6, hot), (0.8, []), (1.2, [])]:
        d, state = decide(snap(irqs=irqs, at=now), crit, state, now)
        seen.append(bool(d.vcpus[1].hint.flags & HintFlag.CRITICAL_IRQ))
    assert seen == [False, False, False, True, True, False]


def test_held_hint_explains_itself():
    state = PolicyState()
    d, state = decide(snap(RT), CFG, state, 0.0)
    d, state = decide(snap([]), CFG, state, 0.5)
    v = d.vcpus[1]
    assert v.hint.request is Request.BOOST and v.wanted.request is Request.NEUTRAL
    assert v.held_until == 2.5
    assert any("held" in r for r in v.reasons)
