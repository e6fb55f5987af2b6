"""Speculation shares the step's token budget with waiting prompts (policy/prefill_share.py):
the pure rules, then the chooser on a planning engine (no models) with SLO classes."""
from __future__ import annotations

import math

import pytest

from helpers import IdTokenizer
from specserve_ray.config import LimitsConfig, SloConfig, SpeculationConfig
from specserve_ray.contracts import StepResult, VerifyResult
from specserve_ray.engine import SpecEngine
from specserve_ray.policy import CostModel
from specserve_ray.policy.prefill_share import (prefill_need, share_caps, spare_for_speculation,
                                                tpot_step_budget)
from specserve_ray.sampling_params import SamplingParams

INF = math.inf


# -- the pure rules ---------------------------------------------------------------------------
def test_prefill_need_from_ttft_slack_and_the_prompts_ahead():
    assert prefill_need([], 0.05) == 0.0
    assert prefill_need([(500, INF)], 0.05) == 0.0          # no TTFT budget: asks nothing
    assert prefill_need([(200, 0.5)], 0.05) == pytest.approx(20.0)
    # The second prompt waits for the first one's chunks too: 200 tokens in 0.2 s.
    assert prefill_need([(100, 1.0), (100, 0.2)], 0.05) == pytest.approx(50.0)
    # A prompt already past its budget needs everything ahead of it now (overload: all
    # are late, and drafting on would only lengthen the queue).
    assert prefill_need([(300, -0.1), (100, 1.0)], 0.05) == pytest.approx(300.0)
    assert prefill_need([(30, 5.0), (20, 0.0)], 0.05) == pytest.approx(50.0)
    assert prefill_need([(200, 0.5)], 0.0) == 0.0           # no step time measured yet


def test_spare_budget_for_drafted_tokens():
    assert spare_for_speculation(64, 4, 0.0) is None        # nobody needs it: no cap
    assert spare_for_speculation(64, 4, 49.5) == 10          # 64 - 4 rows - 50
    assert spare_for_speculation(64, 4, 80.0) == 0


def test_share_caps_lowers_the_deepest_drafts_first():
    assert share_caps([4, 4, 4], 12, [False] * 3) == [4, 4, 4]      # fits: unchanged
    assert share_caps([4, 4, 4], 7, [False] * 3) == [2, 2, 2]
    assert share_caps([1, 4, 4], 5, [False] * 3) == [1, 2, 2]
    assert share_caps([4, 4, 4], 0, [False] * 3) == [0, 0, 0]
    # A row behind its TPOT budget keeps its cap, and it is paid first.
    assert share_caps([4, 4, 4], 6, [True, False, False]) == [4, 1, 1]
    assert share_caps([4, 4, 4], 3, [True, False, False]) == [4, 0, 0]


def test_the_budget_grows_into_the_rows_tpot_room():
    # budget 32, ceiling 256, 1 ms per step token.
    assert tpot_step_budget(32, 256, [INF, INF], [0.0, 0.0], 0.001) == 32   # no TPOT budget
    assert tpot_step_budget(32, 256, [0.05], [0.0], 0.001) == 50
    assert tpot_step_budget(32, 256, [0.05], [-1.0], 0.001) == 50     # behind: its budget only
    assert tpot_step_budget(32, 256, [0.05], [0.1], 0.001) == 150     # it may spend its lead
    assert tpot_step_budget(32, 256, [0.05], [10.0], 0.001) == 250    # up to four budgets
    assert tpot_step_budget(32, 200, [0.05], [10.0], 0.001) == 200    # the ceiling
    assert tpot_step_budget(32, 256, [0.05, 0.02], [0.1, 0.0], 0.001) == 32   # tightest row
    assert tpot_step_budget(32, 256, [0.05], [0.1], 0.0) == 32        # nothing measured yet
    assert tpot_step_budget(32, 32, [0.05], [0.1], 0.001) == 32       # no room above


# -- the chooser ------------------------------------------------------------------------------
SPEC_FRIENDLY = CostModel((0.01, 1e-4, 1e-5, 1e-8), (1e-4, 1e-4, 1e-5, 1e-9))
PARAMS = SamplingParams(max_tokens=60, ignore_eos=True)


def _engine(policy: str, slo_class: dict, yield_to_prompts: bool = True) -> SpecEngine:
    limits = LimitsConfig(max_model_len=512, max_num_seqs=8, max_tokens=100,
                          max_num_batched_tokens=32, max_prefill_tokens_idle=256)
    spec = SpeculationConfig(num_speculative_tokens=4, policy=policy,
                             yield_to_prompts=yield_to_prompts)
    engine = SpecEngine.remote(IdTokenizer(), 96, True, limits, spec,
                               cost_model=SPEC_FRIENDLY,
                               slo=SloConfig(classes=[{"name": "c", **slo_class}]))
    for _ in range(4):
        engine.add_request(list(range(5, 25)), PARAMS, slo_class="c")
    engine.apply_step(engine.plan_step(), StepResult([40] * 4, None, None), 0.01)
    return engine


def _step(engine, seconds=0.05):
    plan = engine.plan_step()
    rows = len(plan.decode_ids)
    engine.apply_step(plan, StepResult([40] * len(plan.prefill),
                                       VerifyResult([[40]] * rows, [0] * rows, seconds), None),
                      seconds)
    return plan


LONG_PROMPT = [5 + i % 80 for i in range(200)]


def _warm_then_long_prompt(engine, seconds=0.05):
    """Three decode steps (the step time is learned), then a 200-token prompt arrives;
    returns the plan of the step after its arrival."""
    for _ in range(3):
        _step(engine, seconds)
    engine.add_request(LONG_PROMPT, PARAMS, slo_class="c")
    return _step(engine, seconds)


@pytest.mark.parametrize("policy,shares", [("specserve", True), ("static:4", False),
                                           ("threshold", False)])
def test_waiting_prompts_take_budget_from_specserve_only(policy, shares):
    engine = _engine(policy, {"ttft_s": 0.3})
    for _ in range(3):                       # steps with nothing waiting: full speculation
        plan = _step(engine)
    assert engine.chooser.step_s_ema == pytest.approx(0.05)
    before = list(plan.num_draft)
    assert engine.chooser.prefill_capped_steps == 0
    # A long prompt arrives: at 0.05 s a step, 200 tokens in 0.3 s need 34 tokens a step,
    # more than the budget of 32 leaves after the 4 rows: specserve drafts nothing.
    engine.add_request(LONG_PROMPT, PARAMS, slo_class="c")
    plan = _step(engine)
    if shares:
        assert plan.num_draft == [0, 0, 0, 0] and engine.chooser.prefill_capped_steps == 1
        assert sum(len(p.prompt_ids) for p in plan.prefill) == 32 - 4
    else:
        assert engine.chooser.prefill_capped_steps == 0
        if policy.startswith("static"):
            assert plan.num_draft == before == [4, 4, 4, 4]


def test_off_by_default():
    engine = _engine("specserve", {"ttft_s": 0.3}, yield_to_prompts=False)
    plan = _warm_then_long_prompt(engine)
    assert engine.chooser.prefill_capped_steps == 0 and any(plan.num_draft)


def test_without_ttft_budgets_nothing_changes():
    engine = _engine("specserve", {"tpot_s": 0.5})
    _warm_then_long_prompt(engine)
    assert engine.chooser.prefill_capped_steps == 0


def test_a_generous_ttft_budget_leaves_room_to_speculate():
    engine = _engine("specserve", {"ttft_s": 5.0})
    # 200 tokens in 5 s at 0.05 s a step: 2 tokens a step; plenty is spare.
    _warm_then_long_prompt(engine)
    assert engine.chooser.prefill_capped_steps == 0


@pytest.mark.parametrize("policy,seconds", [("static:4", 0.05), ("none", 0.004)])
def test_prompts_get_more_of_a_step_while_rows_have_tpot_room(policy, seconds):
    """Any policy: rows 0.1 s within their TPOT budget let a waiting prompt take more than
    the configured budget of 32 (up to the idle budget)."""
    engine = _engine(policy, {"tpot_s": 0.1})
    for _ in range(3):
        plan = _step(engine, seconds)
    rows = sum(k + 1 for k in plan.num_draft)
    assert engine.token_s_ema == pytest.approx(seconds / rows)
    engine.add_request(LONG_PROMPT, PARAMS, slo_class="c")
    plan = _step(engine, seconds)
    chunk = sum(len(p.prompt_ids) for p in plan.prefill)
    decode = sum(k + 1 for k in plan.num_draft)
    assert 32 < decode + chunk <= 256 and chunk == min(200, engine.chooser.step_budget - decode)


def test_no_tpot_budget_keeps_the_configured_budget():
    engine = _engine("static:4", {"ttft_s": 5.0})
    plan = _warm_then_long_prompt(engine)
    assert sum(len(p.prompt_ids) for p in plan.prefill) + sum(k + 1 for k in plan.num_draft) == 32


def test_the_learned_step_law_lets_a_prompt_fill_the_rows_room():
    """Small decode steps look dear per token when their fixed part is spread over them
    (the mean rule: 0.2 s of room at 5 ms a token is 40 tokens); the fitted law pays the
    fixed 20 ms once and 0.4 ms a token after it, so the prompt fills the idle budget."""
    def grown_step(fed_law: bool) -> int:
        engine = _engine("none", {"tpot_s": 0.05})
        for _ in range(3):
            _step(engine, 0.02)
        if fed_law:
            for n in [4, 4, 64, 4, 200, 4, 4, 37] * 2:
                engine.step_law.observe(n, 0.02 + 4e-4 * n)
        engine.add_request(LONG_PROMPT, PARAMS, slo_class="c")
        plan = _step(engine, 0.02)
        return sum(len(p.prompt_ids) for p in plan.prefill) + sum(k + 1 for k in plan.num_draft)

    assert 32 < grown_step(fed_law=False) < 64
    assert grown_step(fed_law=True) == 4 + 200    # the whole prompt in one step (idle budget 256)


def test_user_config_switches_the_prompt_rule_live():
    from specserve_ray.user_config import UserConfig

    assert UserConfig.parse({"yield_to_prompts": True}).yield_to_prompts is True
    assert UserConfig.parse({"yield_to_prompts": False}).yield_to_prompts is False
    assert UserConfig.parse({}).yield_to_prompts is None          # omitted: unchanged
    with pytest.raises(ValueError, match="yield_to_prompts"):
        UserConfig.parse({"yield_to_prompts": "yes"})
