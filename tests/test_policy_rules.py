"""Pure tests of the speculation policies' rules: the SLO cap (per request, with slack,
least overrun when unmeetable), SLO classes, the baselines (SmartSpec, threshold), the
scheduler's caps, the learned state, and the policy string. No models, no Ray.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from policy_sim import REGIMES, state_for, true_cost
from specserve_ray.policy import (BatchState, ConfidenceThreshold, CostModel, LearnedState,
                                  NoSpeculation, SloRegistry, SloTracker, SmartSpec, SpecServe,
                                  SloClass, StaticK, StepFeedback, admission_order, make_policy,
                                  record_step, start_drafting, tightest_tpot,
                                  update_confidence_ema)
from specserve_ray.policy.specserve import predicted_goodput, slo_feasible_k


# -- SLO -------------------------------------------------------------------------------------
def test_slo_cap_per_request_with_slack_and_least_overrun_when_unmeetable():
    rng = np.random.default_rng(4)
    for _ in range(100):
        regime = str(rng.choice(list(REGIMES)))
        cost, batch = true_cost(regime), int(rng.integers(1, 65))
        budgets = rng.uniform(0.002, 0.08, size=batch)
        slack = rng.uniform(-0.05, 0.05, size=batch)
        confidence = rng.uniform(0.0, 1.0, size=batch)
        state = BatchState(tuple(int(c) for c in rng.integers(100, 3000, size=batch)),
                           (8,) * batch, tuple(confidence), tpot_budget_s=tuple(budgets),
                           tpot_slack_s=tuple(slack))
        k = max(SpecServe(cost, probe_every=10 ** 9).decide(state).max_k)
        tokens, seconds, goodput = predicted_goodput(cost, state, confidence, 8)
        # Each request's own acceptance and banked slack (up to 4 budgets), not the mean.
        lead = np.clip(slack, 0, 4 * budgets)
        worst = ((seconds[:, None] - lead[None, :]) / (tokens * budgets[None, :])).max(axis=1)
        fits = worst <= 1.0
        if fits.any():
            assert fits[k] and goodput[k] == pytest.approx(goodput[fits].max())
        else:   # unmeetable: the least time per emitted token against the budget
            assert worst[k] == pytest.approx(worst.min())
        assert list(slo_feasible_k(seconds, tokens, budgets, slack)[1]) == pytest.approx(list(worst))
    # Unmeetable, and a draft step emits more per second than a plain one: not plain.
    cost = true_cost("memory-bound")
    hopeless = state_for(8, 0.9, tpot_budget_s=(1e-5,) * 8)
    assert max(SpecServe(cost).decide(hopeless).max_k) > 0
    # The same budget allows deeper drafts for requests that are likely accepted.
    step1 = float(cost.predict_step(8, 1, 512))
    sure = max(SpecServe(cost).decide(state_for(8, 0.9, tpot_budget_s=(step1,) * 8)).max_k)
    unsure = max(SpecServe(cost).decide(state_for(8, 0.05, tpot_budget_s=(step1 / 1.05,) * 8)).max_k)
    assert sure > 1 and unsure == 0


def test_slo_classes_registry_order_and_tracker():
    registry = SloRegistry.from_config([{"name": "chat", "ttft_s": 1.0, "tpot_s": 0.05},
                                        {"name": "batch", "ttft_s": 30.0}], default="batch")
    chat, bulk = registry.get("chat"), registry.get()
    assert bulk.name == "batch" and bulk.tpot_s == math.inf
    assert tightest_tpot([bulk, chat]) == 0.05 and tightest_tpot([]) == math.inf
    with pytest.raises(ValueError):
        registry.get("gold")
    with pytest.raises(ValueError):
        SloRegistry.from_config([{"name": "x", "tpot": 1}])
    with pytest.raises(ValueError):
        SloRegistry.from_config([{"name": "x"}], default="y")
    # Slack at now=10: bulk(arrived 0) 20 s, chat(arrived 9.5) 0.5 s, chat(arrived 9.8) 0.8 s.
    assert admission_order([(0.0, bulk.ttft_budget()), (9.5, chat.ttft_budget()),
                            (9.8, chat.ttft_budget())], now=10.0) == [1, 2, 0]
    one, two = SloTracker(), SloTracker()
    assert one.record(chat, 0.5, 0.04) and not one.record(chat, 0.5, 0.06)
    assert not two.record(chat, 2.0, 0.01) and two.record(bulk, 5.0, None)
    total = one + two
    assert total.per_class["chat"].requests == 3 and total.per_class["chat"].attained == 1
    assert total.attainment("chat") == pytest.approx(1 / 3) and total.attainment() == pytest.approx(0.5)
    assert one.per_class["chat"].requests == 2          # adding does not mutate
    assert total.summary()["chat"]["tpot_met"] == 2


def test_ttft_budget_that_grows_with_the_prompt():
    """ttft_per_prompt_token_s: a long prompt gets the prefill time its length needs; the
    budget orders admission (a short prompt that arrived later may be more urgent) and
    judges attainment at the request's own prompt length."""
    grow = SloClass("grow", ttft_s=0.1, tpot_s=0.05, ttft_per_prompt_token_s=0.001)
    assert grow.ttft_budget(0) == pytest.approx(0.1)
    assert grow.ttft_budget(900) == pytest.approx(1.0)
    assert SloClass("flat", ttft_s=0.3).ttft_budget(10_000) == pytest.approx(0.3)
    # arrived at 0 with 900 tokens (deadline 1.0) vs at 0.2 with 100 tokens (deadline 0.4)
    assert admission_order([(0.0, grow.ttft_budget(900)), (0.2, grow.ttft_budget(100))],
                           now=0.3) == [1, 0]
    t = SloTracker()
    assert t.record(grow, 0.8, 0.04, prompt_tokens=900)
    assert not t.record(grow, 0.8, 0.04, prompt_tokens=100)
    registry = SloRegistry.from_config([{"name": "g", "ttft_s": 0.1,
                                         "ttft_per_prompt_token_s": 0.002}])
    assert registry.get("g").ttft_budget(50) == pytest.approx(0.2)
    assert t.report(registry)["classes"]["g"]["ttft_per_prompt_token_s"] == 0.002
    with pytest.raises(ValueError, match="needs a ttft_s"):
        SloClass("bad", ttft_per_prompt_token_s=0.001)
    with pytest.raises(ValueError):
        SloClass("bad", ttft_s=1.0, ttft_per_prompt_token_s=-1.0)


# -- the baselines, caps and learned state ------------------------------------------------------
def test_smartspec_ema_and_periodic_redecision():
    policy = SmartSpec(true_cost("memory-bound"), initial_acceptance=0.7)
    state = state_for(4, 0.9)
    first = policy.decide(state)
    assert first.max_k == (policy.k,) * 4 and policy.k > 0 and first.control is None
    feedback = StepFeedback((4, 4, 4, 4), (0, 0, 2, 2), 0.03)
    assert not policy.observe(feedback)
    assert policy.acceptance == pytest.approx(0.85 * 0.7 + 0.15 * 0.25)
    hopeless = StepFeedback((4, 4, 4, 4), (0, 0, 0, 0), 0.03)
    for _ in range(18):                                   # steps 2..19: k stays put
        assert not policy.observe(hopeless)
        assert policy.decide(state).max_k == first.max_k
    assert policy.observe(hopeless)                       # step 20 re-decides
    assert max(policy.decide(state).max_k) < max(first.max_k)
    low = policy.acceptance
    assert policy.observe(StepFeedback((0,) * 4, (0,) * 4, 0.02)) is False
    assert policy.acceptance == pytest.approx(low + 0.05 * (0.7 - low))   # plain steps relax a up
    # Ties go to plain decoding: goodput(0) carries a 10% bonus.
    flat = SmartSpec(CostModel((0.01, 0, 0, 0), (0, 0.001, 0, 0)), initial_acceptance=0.1)
    assert flat.best_k(state) == 0


def test_threshold_stop_rule():
    decision = ConfidenceThreshold(0.4, max_k=5).decide(state_for(3, 0.5))
    control = decision.control
    assert decision.max_k == (5, 5, 5) and control.stop == "threshold"
    progress = start_drafting(decision.max_k)
    assert control.should_continue(progress).all()         # always drafts one token
    progress = record_step(progress, np.array([0.9, 0.39, 0.4]), np.ones(3, bool))
    assert list(control.should_continue(progress)) == [True, False, True]
    progress = record_step(progress, np.array([0.9, 0.9, 0.1]), control.should_continue(progress))
    assert list(control.should_continue(progress)) == [True, False, False]
    assert list(progress.num_drafted) == [2, 1, 2]


def test_policies_choose_within_the_schedulers_caps():
    """k is clamped in one place (SpeculationChooser._final_ks); policies read the caps it
    computed (BatchState.k_cap) and never exceed or recompute them."""
    cost = true_cost("memory-bound")
    capped = BatchState((512,) * 3, (0, 2, 5), (0.95,) * 3)
    for policy in [StaticK(6), ConfidenceThreshold(), SmartSpec(cost), SpecServe(cost)]:
        ks = policy.decide(capped).max_k
        assert ks[0] == 0 and ks[1] <= 2 and ks[2] <= 5 and max(ks) > 0, policy.name
        assert not policy.decide(BatchState((512,) * 2, (0, 0), (0.95,) * 2)).speculates
    assert StaticK(5).decide(capped).max_k == (0, 2, 5)
    assert NoSpeculation().decide(capped).max_k == (0, 0, 0)


def test_learned_state_corrects_cost_and_persists():
    cost = true_cost("memory-bound")
    learned = LearnedState(cost)
    expected = float(cost.predict_verify(4, 12, 512.0))
    honest = StepFeedback((2,) * 4, (1,) * 4, 0.03, verify_seconds=expected, batch_size=4,
                          context=512.0)
    learned.observe(honest)
    assert cost.scale["verify"] == 1.0
    for _ in range(30):
        learned.observe(StepFeedback((2,) * 4, (1,) * 4, 0.03, verify_seconds=1.5 * expected,
                                     batch_size=4, context=512.0))
    assert cost.scale["verify"] == pytest.approx(1.5, rel=0.05)
    # Each row: its first draft token accepted, its second rejected (conditional rates).
    assert learned.prior() > 0.95 and learned.prior(depth=1) < 0.05
    learned.goodput.observe(8, 2, 100.0, 50.0)
    restored = LearnedState().load(learned.to_dict())
    assert restored.prior() == pytest.approx(learned.prior())
    assert restored.goodput.factor(7, 2) == pytest.approx(0.5)   # 5-8 share a bucket
    assert restored.goodput.factor(16, 2) == 1.0
    assert LearnedState().load({"format": 1, "acceptance": "junk"}).prior() == 0.5
    saved = CostModel.from_dict(cost.to_dict())
    assert saved.scale["verify"] == pytest.approx(cost.scale["verify"])


def test_confidence_ema_update_and_relaxation():
    ema = update_confidence_ema([0.5, 0.2, 0.9], np.array([[1.0, 0.6], [0, 0], [0, 0]]), [2, 0, 0],
                                weight=0.5, prior=0.5, relax=0.5)
    # Idle rows relax toward the measured prior, from below and from above.
    assert ema == pytest.approx([0.65, 0.35, 0.7])


def test_batch_state_validates_lengths():
    with pytest.raises(ValueError):
        BatchState((1, 2), (3,), (0.5, 0.5))
    assert state_for(3, 0.5).tightest_tpot == math.inf
    assert state_for(2, 0.5, tpot_budget_s=(0.1, 0.05)).tightest_tpot == 0.05
    assert list(BatchState((1, 9), (3, 3), (None, 0.7)).confidence(0.4)) == [0.4, 0.7]
    assert BatchState((1, 9), (3, 3), (None, 0.7)).max_context == 9


@pytest.mark.parametrize("spec, kind", [("none", NoSpeculation), ("static:3", StaticK),
                                        (" Static:0 ", StaticK), ("static", StaticK),
                                        ("threshold", ConfidenceThreshold),
                                        ("threshold:0.6", ConfidenceThreshold),
                                        ("smartspec", SmartSpec), ("specserve", SpecServe)])
def test_make_policy_parses(spec, kind):
    policy = make_policy(spec, true_cost("memory-bound"), max_k=6)
    assert isinstance(policy, kind)
    if spec == "static:3":
        assert policy.max_k == 3
    if spec == "static":                 # a bare "static" drafts the config's k
        assert policy.max_k == 6
    if spec == "threshold:0.6":
        assert policy.threshold == 0.6


@pytest.mark.parametrize("spec", ["", "static:x", "static:-1", "static:99", "threshold:x",
                                  "threshold:1.5", "none:2", "specserve:3", "adaptive", None])
def test_make_policy_rejects(spec):
    with pytest.raises(ValueError):
        make_policy(spec, true_cost("memory-bound"))


def test_cost_based_policies_need_a_cost_model():
    for spec in ("smartspec", "specserve"):
        with pytest.raises(ValueError, match="cost model"):
            make_policy(spec, None)
    assert isinstance(make_policy("static:2", None), StaticK)
