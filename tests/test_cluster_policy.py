"""Cluster-wide speculation bounds (pure rule), their application in the engine, and the
replica autoscaling decision."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from helpers import GREEDY, IdTokenizer, make_engine, perturbed, random_prompts
from helpers import hf_greedy, tiny_model
from specserve_ray.config import LimitsConfig, SpeculationConfig
from specserve_ray.engine import SpecEngine
from specserve_ray.policy import CostModel
from specserve_ray.policy.cluster import (ClusterBounds, ClusterBoundsConfig, ClusterSignals,
                                          RouterSignals, bound_ks, bounds_from_dict,
                                          bounds_to_dict, useful_depth)
from specserve_ray.contracts import RuntimeBounds
from specserve_ray.policy.replicas import ReplicaLoad, desired_replicas

from deployments.autoscaling import SpecAutoscalingPolicy, loads_from_metrics


def router(rid="r0", running=2, capacity=16, queue=0, step_s=0.02, steps=50, tpot=math.inf,
           max_k=8, drafts=0, first=0, slo=(0, 0)) -> RouterSignals:
    return RouterSignals(router_id=rid, window_s=1.0, arrivals=3, queue_depth=queue,
                         running=running, capacity=capacity, decode_steps=steps,
                         decode_rows=steps * running, decode_seconds=steps * step_s,
                         num_drafts=drafts, accepted_first_pos=first, max_k=max_k,
                         tightest_tpot_s=tpot, slo_requests=slo[0], slo_attained=slo[1])


def cluster(*routers) -> ClusterSignals:
    return ClusterSignals.aggregate(routers)


LOW = cluster(router("a", running=2), router("b", running=3))
BUSY = cluster(router("a", running=16, queue=5), router("b", running=16, queue=2))
MIDDLE = cluster(router("a", running=11), router("b", running=11))     # 69%: in the band


def test_aggregate_sums_routers():
    c = cluster(router("a", running=4, queue=1, step_s=0.02, tpot=0.05),
                router("b", running=8, step_s=0.04, capacity=8, tpot=0.03))
    assert (c.routers, c.running, c.capacity, c.queue_depth, c.max_running) == (2, 12, 24, 1, 8)
    assert c.utilization == pytest.approx(0.5)
    assert c.mean_step_s == pytest.approx(0.03) and c.tightest_tpot_s == 0.03
    assert c.arrival_rate == pytest.approx(6.0)
    assert ClusterSignals.aggregate([]).routers == 0
    r = router(tpot=math.inf)
    assert RouterSignals.from_dict(r.to_dict()) == r        # inf survives the wire (None)


def test_low_load_keeps_full_speculation():
    rule = ClusterBounds()
    for _ in range(10):
        rule.update(LOW)
    assert rule.bounds == RuntimeBounds(True, None, None) and rule.level == 8


def test_overload_halves_the_cap_down_to_off():
    rule = ClusterBounds()
    caps = []
    for _ in range(5):
        rule.update(BUSY)
        caps.append((rule.bounds.speculation_enabled, rule.bounds.max_k))
    assert caps == [(True, 4), (True, 2), (True, 1), (False, 0), (False, 0)]
    assert "queued" in rule.reason


def test_recovery_is_slow_and_hysteretic():
    cfg = ClusterBoundsConfig(raise_after=3)
    rule = ClusterBounds(cfg)
    for _ in range(4):
        rule.update(BUSY)
    assert not rule.bounds.speculation_enabled
    # The band between the thresholds holds the cap and resets the calm count.
    for _ in range(5):
        rule.update(MIDDLE)
    assert rule.level == 0 and rule.reason == "hold"
    levels = []
    for _ in range(9):
        rule.update(LOW)
        levels.append(rule.level)
    assert levels == [0, 0, 1, 1, 1, 2, 2, 2, 3]        # +1 per raise_after calm updates
    assert rule.bounds.speculation_enabled and rule.bounds.max_k == 3
    # A calm streak broken by the band starts over.
    rule.update(LOW)
    rule.update(LOW)
    rule.update(MIDDLE)
    rule.update(LOW)
    assert rule.level == 3
    # Back at the ceiling the cap is lifted entirely.
    for _ in range(3 * 5):
        rule.update(LOW)
    assert rule.level == 8 and rule.bounds.max_k is None


def test_slow_steps_against_the_tightest_tpot_are_pressure_even_at_low_load():
    rule = ClusterBounds()
    slow = cluster(router("a", running=2, step_s=0.08, tpot=0.05), router("b", running=1))
    assert rule.update(slow)
    assert rule.bounds.max_k == 4 and "TPOT" in rule.reason
    # Inside the budget but above the margin (0.8 * 50 ms) is not calm: the cap holds.
    near = cluster(router("a", running=2, step_s=0.045, tpot=0.05))
    for _ in range(6):
        rule.update(near)
    assert rule.level == 4


def test_missed_slos_are_pressure_once_there_are_enough_samples():
    rule = ClusterBounds(ClusterBoundsConfig(min_slo_requests=5, attainment_target=0.9))
    rule.update(cluster(router(running=2, slo=(4, 0))))       # too few to judge
    assert rule.level == 8
    rule.update(cluster(router(running=2, slo=(10, 7))))
    assert rule.level == 4 and "attainment" in rule.reason


def test_acceptance_caps_depth_but_never_below_one():
    assert useful_depth(0.5, 0.05, 8) == 4         # 0.5^4 = 0.06 >= 0.05 > 0.5^5
    assert useful_depth(0.95, 0.05, 8) == 8
    assert useful_depth(0.01, 0.05, 8) == 1
    rule = ClusterBounds()
    rule.update(cluster(router(running=2, drafts=100, first=50)))
    assert rule.bounds == RuntimeBounds(True, 4, None) and rule.level == 8
    rule.update(cluster(router(running=2, drafts=10, first=0)))   # too few drafts to judge
    assert rule.bounds.max_k is None


def test_verify_knee_budget_follows_the_largest_batch():
    rule = ClusterBounds(ClusterBoundsConfig(verify_knee_tokens=20))
    rule.update(cluster(router("a", running=4), router("b", running=6)))
    assert rule.bounds.verify_budget == 14 and rule.bounds.speculation_enabled
    rule.update(cluster(router("a", running=4), router("b", running=7)))
    assert rule.bounds.verify_budget == 13
    # A batch at the knee: nothing left to verify, speculation off until batches shrink.
    rule.update(cluster(router("a", running=4, capacity=32), router("b", running=20, capacity=32)))
    assert rule.bounds.verify_budget == 0 and not rule.bounds.speculation_enabled


def test_no_reports_keep_the_bounds():
    rule = ClusterBounds()
    rule.update(BUSY)
    before = rule.bounds
    assert not rule.update(ClusterSignals())
    assert rule.bounds == before


def test_config_validation():
    with pytest.raises(ValueError):
        ClusterBoundsConfig(low_utilization=0.9, high_utilization=0.5)
    with pytest.raises(ValueError):
        ClusterBoundsConfig(verify_knee_tokens=0)
    with pytest.raises(ValueError):
        bounds_from_dict({"max_k": -1})
    b = RuntimeBounds(True, 3, 7)
    assert bounds_from_dict(bounds_to_dict(b)) == b


@pytest.mark.parametrize("ks,bounds,expected", [
    ([4, 4, 4], RuntimeBounds(), [4, 4, 4]),
    ([4, 4, 4], RuntimeBounds(False, None, None), [0, 0, 0]),
    ([4, 1, 6], RuntimeBounds(True, 3, None), [3, 1, 3]),
    ([4, 1, 6], RuntimeBounds(True, None, 6), [3, 1, 2]),    # deepest rows lose first
    ([4, 4, 4], RuntimeBounds(True, None, 7), [3, 2, 2]),
    ([4, 4, 4], RuntimeBounds(True, 2, 100), [2, 2, 2]),
    ([4, 4], RuntimeBounds(True, None, 0), [0, 0]),
    ([], RuntimeBounds(True, 1, 1), []),
])
def test_bound_ks_only_lowers(ks, bounds, expected):
    out = bound_ks(ks, bounds)
    assert out == expected
    assert all(o <= k for o, k in zip(out, ks))
    if bounds.verify_budget is not None:
        assert sum(out) <= bounds.verify_budget


# -- bounds in the engine --------------------------------------------------------------------
def _planning_engine(spec: SpeculationConfig, cost=None) -> SpecEngine:
    engine = SpecEngine.remote(IdTokenizer(), 96, True, LimitsConfig(max_model_len=256, max_num_seqs=4,
                                                                    max_tokens=100), spec,
                               cost_model=cost)
    for p in random_prompts(3, seed=1):
        engine.add_request(p, GREEDY)
    engine.plan_step()            # admits (prefill); the next plan decodes
    return engine


SPEC_FRIENDLY = CostModel((0.01, 1e-4, 1e-5, 1e-8), (1e-4, 1e-4, 1e-5, 1e-9))


def test_engine_bounds_cap_static_k_and_survive_policy_switches():
    engine = _planning_engine(SpeculationConfig(num_speculative_tokens=4), SPEC_FRIENDLY)
    assert engine.plan_step().num_draft == [4, 4, 4]
    engine.chooser.apply_bounds(RuntimeBounds(True, 2, 5))
    assert engine.plan_step().num_draft == [2, 2, 1]
    # Switching policy rebuilds it; the bounds are the chooser's (applied with every other
    # cap in SpeculationChooser._final_ks, and given to the policy as its caps), so they
    # carry over.
    engine.speculation = SpeculationConfig(num_speculative_tokens=4, policy="specserve")
    assert engine.chooser.bounds == RuntimeBounds(True, 2, 5)
    plan = engine.plan_step()
    assert max(plan.num_draft) <= 2 and sum(plan.num_draft) <= 5
    engine.chooser.apply_bounds(RuntimeBounds(False, None, None))
    assert engine.plan_step().num_draft == [0, 0, 0]
    engine.speculation = SpeculationConfig(num_speculative_tokens=4, policy="static:3")
    assert engine.plan_step().num_draft == [0, 0, 0]
    engine.chooser.apply_bounds(RuntimeBounds())
    assert engine.plan_step().num_draft == [3, 3, 3]


def test_bounded_engine_stays_lossless():
    target = tiny_model("llama", seed=0)
    engine = make_engine(target, perturbed(target, 0.15), k=4, max_seqs=4)
    engine.chooser.apply_bounds(RuntimeBounds(True, 2, 3))
    prompts = random_prompts(4, seed=11)
    results = engine.generate(prompts, GREEDY)
    for prompt, res in zip(prompts, results):
        assert res.output_ids == hf_greedy(target, prompt, GREEDY.max_tokens)
    assert 0 < engine.totals.num_draft_tokens


# -- replica autoscaling ---------------------------------------------------------------------
def test_desired_replicas_from_demand_and_latency():
    idle = [ReplicaLoad(0, 0, 16)]
    assert desired_replicas(idle, current=1) == 0          # Serve's min_replicas floors it
    assert desired_replicas([ReplicaLoad(6, 0, 16)], current=1) == 1
    assert desired_replicas([ReplicaLoad(16, 10, 16)], current=1) == 3     # 26 / 12
    two = [ReplicaLoad(16, 4, 16), ReplicaLoad(16, 6, 16)]
    assert desired_replicas(two, current=2) == 4
    assert desired_replicas(two, current=2, handle_queued=10) == 5
    # Slow steps with half-full batches add one; slow steps on tiny batches do not.
    slow_full = [ReplicaLoad(8, 0, 16, step_s=0.1, tpot_budget_s=0.05)]
    assert desired_replicas(slow_full, current=1) == 2
    slow_small = [ReplicaLoad(2, 0, 16, step_s=0.1, tpot_budget_s=0.05)]
    assert desired_replicas(slow_small, current=1) == 1
    assert desired_replicas([], current=3) == 3
    with pytest.raises(ValueError):
        desired_replicas(idle, current=1, target_utilization=0)


def test_serve_policy_adapter_reads_router_stats():
    ctx = SimpleNamespace(
        aggregated_metrics={"running": {"r1": 16.0, "r2": 16.0}, "queue_depth": {"r1": 8.0, "r2": 4.0},
                            "capacity": {"r1": 16.0, "r2": 16.0}, "step_s": {"r1": 0.02, "r2": 0.0},
                            "tpot_budget_s": {"r1": 0.0, "r2": 0.0}},
        total_queued_requests=0.0, current_num_replicas=2, target_num_replicas=2)
    loads = loads_from_metrics(ctx.aggregated_metrics)
    assert loads[1].step_s is None and math.isinf(loads[0].tpot_budget_s)
    wanted, state = SpecAutoscalingPolicy(target_utilization=0.75)(ctx)
    assert wanted == 4 and state == {"last_desired": 4}
    # Before any router reported its stats, keep the current target.
    ctx.aggregated_metrics = {}
    assert SpecAutoscalingPolicy()(ctx) == (2, {})
