"""SLO classes in the engine: config, admission by TTFT slack, the TPOT cap on k, and
per-class attainment, with greedy output still equal to target-only greedy output.

In-process engines on tiny random models (as in test_policy_wiring); the deployment's
front doors are covered in test_deployment.
"""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from pydantic import ValidationError

from helpers import hf_greedy, tiny_model
from helpers import GREEDY, make_engine, perturbed, random_prompts
from test_policy_wiring import SPEC_FRIENDLY
from specserve_ray.async_engine import AsyncSpecEngine
from specserve_ray.config import AppConfig, EngineConfig, SloConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.errors import RequestError
from specserve_ray.policy import CostModel
from specserve_ray.policy.efficiency import expected_tokens_uniform
from specserve_ray.workers.host import run_draft, run_target

CLASSES = [{"name": "interactive", "ttft_s": 1.0, "tpot_s": 0.1},
           {"name": "batch", "ttft_s": 60.0}]


def slo_engine(target, draft, slo: SloConfig, policy: str = "static", k: int = 4,
               max_seqs: int = 8):
    engine = make_engine(target, draft, k=k, max_seqs=max_seqs)
    engine.slo = slo
    if policy != "static":
        # A copy: the policy's online correction rescales the model it is given.
        engine.cost_model = CostModel.from_dict(SPEC_FRIENDLY.to_dict())
        engine.speculation = SpeculationConfig(num_speculative_tokens=k, policy=policy)
    return engine


def predicted_step(engine, batch: int, k: int, context: float) -> float:
    return float(engine.cost_model.predict_step(batch, k, context))


# -- config ------------------------------------------------------------------------------------
def test_default_config_has_only_best_effort_without_budgets():
    registry = EngineConfig().slo.registry()
    assert list(registry.classes) == ["best-effort"] and registry.default == "best-effort"
    cls = registry.get()
    assert math.isinf(cls.ttft_s) and math.isinf(cls.tpot_s)


def test_slo_config_classes_and_validation():
    cfg = AppConfig(engine={"slo": {"classes": CLASSES, "default_class": "batch"}})
    registry = cfg.engine.slo.registry()
    assert sorted(registry.classes) == ["batch", "best-effort", "interactive"]
    assert registry.get().name == "batch" and registry.get("interactive").tpot_s == 0.1
    assert math.isinf(registry.get("batch").tpot_s)
    # A user-defined best-effort class replaces the implicit one.
    own = SloConfig(classes=[{"name": "best-effort", "ttft_s": 5.0}]).registry()
    assert own.get().ttft_s == 5.0
    # The JSON form build_app hands the router (None for no budget) round-trips.
    again = AppConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.engine.slo == cfg.engine.slo
    bad = [({"classes": [{"name": "a"}, {"name": "a"}]}, "unique"),
           ({"default_class": "gold"}, "not a defined SLO class; known: \\['best-effort'\\]"),
           ({"classes": [{"name": "a", "tpot_s": 0}]}, "greater than 0"),
           ({"classes": [{"name": "a", "ttft_s": -1.0}]}, "greater than 0"),
           ({"classes": [{"name": ""}]}, "at least 1 character"),
           ({"classes": [{"name": "a", "tpot": 0.1}]}, "tpot"),
           ({"classes": [{"name": " a"}]}, "whitespace"),
           ({"classes": [{"name": "a", "ttft_per_prompt_token_s": 0.001}]}, "needs a ttft_s"),
           ({"classes": [{"name": "a", "ttft_s": 1, "ttft_per_prompt_token_s": -1}]},
            "greater than or equal to 0"),
           ({"classes": [{"name": "a", "ttft_s": 1, "ttft_per_prompt_token_s": "inf"}]},
            "finite")]
    grow = SloConfig(classes=[{"name": "g", "ttft_s": 0.2, "ttft_per_prompt_token_s": 0.001}])
    assert grow.registry().get("g").ttft_budget(300) == pytest.approx(0.5)
    for slo, needle in bad:
        with pytest.raises(ValidationError, match=needle):
            EngineConfig(slo=slo)


# -- requests ----------------------------------------------------------------------------------
def test_unknown_class_is_a_request_error_listing_known_names(pair):
    target, draft = pair
    engine = slo_engine(target, draft, SloConfig(classes=CLASSES))
    with pytest.raises(RequestError, match=r"unknown SLO class 'gold'; known: "
                                           r"\['batch', 'best-effort', 'interactive'\]"):
        engine.add_request([5, 6, 7], GREEDY, slo_class="gold")
    with pytest.raises(RequestError, match="slo_class must be a string"):
        engine.add_request([5, 6, 7], GREEDY, slo_class=3)
    assert not engine.has_unfinished()               # nothing half-added
    rid = engine.add_request([5, 6, 7], GREEDY, slo_class="interactive")
    assert engine.waiting[0].request_id == rid and engine.waiting[0].slo.name == "interactive"
    assert engine.add_request([5, 6], GREEDY) and engine.waiting[1].slo.name == "best-effort"


def _admitted_order(engine, steps: int) -> list[str]:
    order = []
    for _ in range(steps):
        for out in engine.step():
            if out.request_id not in order:
                order.append(out.request_id)
    return order


def test_admission_by_least_ttft_slack_when_slots_are_short(pair):
    target, draft = pair
    engine = slo_engine(target, draft, SloConfig(classes=CLASSES), max_seqs=1)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for name, cls in [("bulk-old", "batch"), ("free", None), ("chat", "interactive"),
                      ("bulk-new", "batch")]:
        engine.add_request([5, 6, 7], params, request_id=name, slo_class=cls)
    # Slack = arrival + TTFT budget - now. bulk-old arrived 59.5 s ago: 0.5 s of slack,
    # less than chat's 1 s, so it goes first despite its looser class.
    by_id = {r.request_id: r for r in engine.waiting}
    by_id["bulk-old"].arrival_time -= 59.5
    # The class without a TTFT budget waits until every budgeted request is in.
    assert _admitted_order(engine, 12) == ["bulk-old", "chat", "bulk-new", "free"]


def test_ttft_budget_per_prompt_token_orders_admission_and_attainment(pair):
    """With a TTFT budget that grows with the prompt, a short prompt that arrived later is
    more urgent than a long one that arrived first, and each is judged at its own length."""
    target, draft = pair
    slo = SloConfig(classes=[{"name": "grow", "ttft_s": 0.5, "ttft_per_prompt_token_s": 0.1}],
                    default_class="grow")
    engine = slo_engine(target, draft, slo, max_seqs=1)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request(list(range(5, 45)), params, request_id="long")     # 40 tokens: 4.5 s
    engine.add_request([5, 6, 7], params, request_id="short")             # 3 tokens: 0.8 s
    engine.add_request([8, 9, 10], params, request_id="filler")
    by_id = {r.request_id: r for r in engine.waiting}
    by_id["filler"].arrival_time -= 10.0       # first in, and already late: it goes first
    by_id["long"].arrival_time -= 1.0          # 3.5 s of slack against short's 0.8 s
    assert _admitted_order(engine, 12) == ["filler", "short", "long"]
    counts = engine.slo_tracker.per_class["grow"]
    # filler is 10 s late; the long prompt's 1 s head start is within its 4.5 s budget.
    assert counts.requests == 3 and counts.ttft_met == 2


def test_admission_stays_fifo_without_ttft_budgets(pair):
    target, draft = pair
    engine = slo_engine(target, draft, SloConfig(classes=[{"name": "chat", "tpot_s": 1.0}]),
                        max_seqs=1)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for name, cls in [("a", None), ("b", "chat"), ("c", None)]:
        engine.add_request([5, 6, 7], params, request_id=name, slo_class=cls)
    assert not engine._slo_orders_admission
    assert _admitted_order(engine, 8) == ["a", "b", "c"]


# -- the TPOT cap on k and losslessness ---------------------------------------------------------
def test_unmeetable_tpot_budget_takes_the_least_time_per_token(pair):
    """Contract changed on purpose (issue 11): when no k meets the budget, the cap is the
    k with the least time per emitted token against it, not plain decoding by default.
    With drafts as cheap as SPEC_FRIENDLY's, that is a speculative step."""
    target, draft = pair
    slo = SloConfig(classes=[{"name": "tight", "tpot_s": 1e-9}], default_class="tight")
    engine = slo_engine(target, draft, slo, policy="specserve")
    prompts = random_prompts(3, seed=11)
    for p in prompts:
        engine.add_request(p, GREEDY)
    engine.step()                                          # prefill
    batch = engine.running
    for r in batch:
        r.confidence_ema = 0.9
    context = max(r.context_len for r in batch)
    ks = range(5)
    per_token = [predicted_step(engine, len(batch), k, context) / expected_tokens_uniform(0.9, k)
                 for k in ks]
    assert max(engine.chooser._choose_k(batch)) == int(np.argmin(per_token)) > 0
    for r in batch:
        r.confidence_ema = 0.0     # nothing accepted: every step emits one token; plain is fastest
    assert max(engine.chooser._choose_k(batch)) == 0
    engine = slo_engine(target, draft, slo, policy="specserve")
    outs = engine.generate(prompts, GREEDY)
    assert [o.output_ids for o in outs] == [hf_greedy(target, p, 24) for p in prompts]


def test_tpot_budget_is_per_emitted_token(pair):
    """A step of k drafts emits ~N(a, k) tokens per request, so a budget equal to the
    step time of k = 1 still allows deeper drafts when drafts are likely accepted, and
    one request's tight budget caps the whole batch."""
    target, draft = pair
    engine = slo_engine(target, draft, SloConfig(classes=CLASSES), policy="specserve", k=6)
    for p in random_prompts(4, seed=3):
        engine.add_request(p, GREEDY)
    engine.step()                                          # prefill
    batch = engine.running
    context = sum(r.context_len for r in batch) / len(batch)
    for r in batch:
        r.confidence_ema = 0.95                            # speculation clearly pays
    assert max(engine.chooser._choose_k(batch)) > 2
    budget = predicted_step(engine, len(batch), 1, context)
    engine.slo = SloConfig(classes=[{"name": "mid", "tpot_s": budget}])
    batch[1].slo = engine.slo.get("mid")                   # one request's budget caps all
    capped = max(engine.chooser._choose_k(batch))
    per_token = predicted_step(engine, len(batch), capped, context) / \
        expected_tokens_uniform(0.95, capped)
    assert capped > 1 and per_token <= budget
    for r in batch:
        r.confidence_ema = 0.0     # drafts never accepted: the step itself must fit
    assert max(engine.chooser._choose_k(batch)) <= 1


def test_greedy_lossless_with_mixed_classes_and_specserve(pair):
    target, draft = pair
    prompts = random_prompts(6, seed=21)
    lengths = [24, 5, 17, 24, 9, 13]
    cost = SPEC_FRIENDLY
    # A budget that caps k at 1 while four requests run and allows more as the batch
    # shrinks, so steps mix capped and uncapped plans as the `chat` requests come and go.
    tight = float(cost.predict_step(4, 1, 20.0) + cost.predict_step(4, 2, 20.0)) / 2
    slo = SloConfig(classes=[{"name": "chat", "ttft_s": 0.5, "tpot_s": tight},
                             {"name": "bulk", "ttft_s": 30.0}])
    engine = slo_engine(target, draft, slo, policy="specserve", max_seqs=4)
    classes = ["chat", "bulk", None, "chat", "bulk", None]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    outs = engine.generate(prompts, params, slo_classes=classes)
    for p, n, o in zip(prompts, lengths, outs):
        assert o.output_ids == hf_greedy(target, p, n)
    assert engine.totals.num_draft_tokens > 0
    counts = engine.slo_summary()["classes"]
    assert {name: c["requests"] for name, c in counts.items()} == {
        "best-effort": 2, "bulk": 2, "chat": 2}


# -- attainment --------------------------------------------------------------------------------
def test_attainment_recorded_per_class(pair):
    target, draft = pair
    slo = SloConfig(classes=[{"name": "impossible", "ttft_s": 1e-9, "tpot_s": 1e-9},
                             {"name": "easy", "ttft_s": 1e6, "tpot_s": 1e6},
                             {"name": "unused", "ttft_s": 2.0}])
    engine = slo_engine(target, draft, slo)
    prompts = random_prompts(5, seed=8)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (6, 1, 6, 6, 3)]
    engine.generate(prompts, params, slo_classes=["impossible", "easy", "easy", None, "easy"])
    summary = engine.slo_summary()
    assert summary["default_class"] == "best-effort"
    c = summary["classes"]
    assert (c["impossible"]["requests"], c["impossible"]["attained"]) == (1, 0)
    assert c["impossible"]["attainment"] == 0.0 and c["impossible"]["ttft_met"] == 0
    assert (c["easy"]["requests"], c["easy"]["attained"], c["easy"]["attainment"]) == (3, 3, 1.0)
    assert c["easy"]["tpot_met"] == 3
    assert c["best-effort"]["requests"] == 1 and c["best-effort"]["attained"] == 1
    assert c["best-effort"]["ttft_budget_s"] is None and c["easy"]["tpot_budget_s"] == 1e6
    assert c["unused"]["requests"] == 0 and c["unused"]["mean_ttft_s"] is None
    for name in ("impossible", "easy", "best-effort"):
        assert 0 < c[name]["mean_ttft_s"] <= c[name]["max_ttft_s"]
    # The one-token request has no TPOT; the two others in `easy` do.
    assert engine.slo_tracker.per_class["easy"].tpot_count == 2
    assert 0 < c["easy"]["mean_tpot_s"] <= c["easy"]["max_tpot_s"]


def test_aborted_requests_are_not_counted(pair):
    target, draft = pair
    engine = slo_engine(target, draft, SloConfig(classes=CLASSES))
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True),
                             slo_class="interactive")
    engine.step()
    engine.abort(rid)
    assert engine.slo_summary()["classes"]["interactive"]["requests"] == 0


def test_async_engine_takes_slo_class_and_reports_attainment(pair):
    target, draft = pair
    engine = slo_engine(target, draft, SloConfig(classes=CLASSES))

    async def execute(plan):
        return run_target(engine.target, run_draft(engine.draft, plan))

    async def main():
        serving = AsyncSpecEngine(engine, execute)
        try:
            prompt = random_prompts(1, seed=4)[0]
            r = await serving.generate(prompt, SamplingParams(max_tokens=7, ignore_eos=True),
                                       slo_class="interactive")
            assert r["token_ids"] == hf_greedy(target, prompt, 7)
            with pytest.raises(RequestError, match="known"):
                await serving.generate(prompt, GREEDY, slo_class="gold")
            streamed = [out async for out in serving.generate_stream(
                prompt, SamplingParams(max_tokens=4, ignore_eos=True), slo_class="batch")]
            assert streamed[-1].finished
            return serving.stats()
        finally:
            await serving.stop()

    stats = asyncio.run(main())
    classes = stats["slo"]["classes"]
    assert classes["interactive"]["requests"] == 1 and classes["batch"]["requests"] == 1
    assert classes["best-effort"]["requests"] == 0
    assert np.isfinite(classes["interactive"]["mean_ttft_s"])
