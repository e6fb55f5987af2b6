"""SpecServe runs its in-loop rules (per-row early stop, verify trim) only while what it
observes agrees with the profile's shape: the rules weigh one more token with the profiled
marginal costs, which the per-cap goodput correction never reaches.

On this repository's engine the profile's marginals were wrong (a verify forward flat in
its token count, a draft worker costing ~3x the profiled forwards per call) and the rules
cost specserve 0.72x of the best static k at batch 1 against 0.93x without them
(scripts/measure_policies.py, README "Adaptivity")."""
from __future__ import annotations

import math

from specserve_ray.policy import BatchState, CostModel, SpecServe

COST = ((0.020, 2e-5, 1e-5, 1e-8), (5e-4, 1.5e-3, 1e-5, 2e-9))   # memory-bound surrogate


def state(batch=8, confidence=0.8):
    return BatchState((512,) * batch, (8,) * batch, (confidence,) * batch)


def policy(**kw):
    return SpecServe(CostModel(*COST), max_k=8, probe_every=10 ** 9, **kw)


def test_rules_run_while_observation_agrees_with_the_profile():
    p = policy()
    decision = p.decide(state())
    assert decision.speculates and decision.control is not None
    # Every cap observed off by the same factor: the profile's shape holds.
    for k in (0, 1, 2, 3):
        p.learned.goodput.observe(8, k, 1.0, 0.8)
    assert p.learned.goodput.spread(8) < 1e-9
    assert p.decide(state()).control is not None


def test_rules_stop_when_caps_are_corrected_unevenly():
    p = policy()
    p.learned.goodput.observe(8, 1, 1.0, 1.0)
    p.learned.goodput.observe(8, 4, 1.0, 0.6)        # deep drafts 40% slower than profiled
    assert abs(p.learned.goodput.spread(8) - math.log(1 / 0.6)) < 1e-9
    decision = p.decide(state())
    assert decision.speculates and decision.control is None     # draft to the cap, verify all
    # Another batch size keeps its own evidence.
    assert p.decide(state(batch=1)).control is not None


def test_rules_stop_when_draft_and_verify_laws_drift_apart():
    p = policy()
    p.cost.scale["draft"] = 2.9                       # as measured on the embedded pair
    assert p.decide(state()).control is None
    p.cost.scale["verify"] = 2.9                      # both off alike: the trade-off holds
    assert p.decide(state()).control is not None


def test_explicit_switch_overrides_the_gate():
    forced = policy(in_loop=True)
    forced.cost.scale["draft"] = 2.9
    assert forced.decide(state()).control is not None
    assert policy(in_loop=False).decide(state()).control is None

