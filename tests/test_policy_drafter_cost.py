"""The policies price a step by who drafts it: n-gram proposals cost no draft forward.

A step whose rows all take prompt-lookup drafts is one target forward; the cost-model
policies (specserve, smartspec) must not charge it the draft model's forwards, or they
refuse speculation that is nearly free. Pure policy math first, then the engine's
chooser, which labels each step with its rows' drafter.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import IdTokenizer
from specserve_ray.config import LimitsConfig, SpeculationConfig
from specserve_ray.contracts import StepResult, VerifyResult
from specserve_ray.engine import SpecEngine
from specserve_ray.policy import CostModel, SpecServe
from specserve_ray.policy.baselines import SmartSpec
from specserve_ray.policy.contracts import BatchState, uses_draft_model
from specserve_ray.sampling_params import SamplingParams

# A flat verify (10 ms whatever the tokens) and a draft model far dearer than it: with
# the model, speculating can never pay; with free proposals it always does.
DEAR_DRAFT = CostModel((0.010, 1e-5, 1e-6, 0.0), (0.005, 0.030, 0.0, 0.0))


def state(drafter: str, confidence: float = 0.6, batch: int = 2) -> BatchState:
    return BatchState((200,) * batch, (4,) * batch, (confidence,) * batch, drafter=drafter)


def policy_conf(batch: int) -> np.ndarray:
    return np.full(batch, 0.6)


def test_step_seconds_leave_the_draft_out_for_ngram():
    with_draft = DEAR_DRAFT.step_seconds(2, [0, 1, 4], 200.0)
    without = DEAR_DRAFT.step_seconds(2, [0, 1, 4], 200.0, drafts=False)
    assert with_draft[0] == without[0]
    for w, (a, b) in zip([1, 4], zip(with_draft[1:], without[1:])):
        assert a == pytest.approx(b + 0.005 + w * 0.030)
    assert list(DEAR_DRAFT.predict_step(2, [1, 4], 200.0, drafts=False)) == \
        pytest.approx(without[1:])
    assert uses_draft_model("model") and uses_draft_model("model+ngram")
    assert not uses_draft_model("ngram")


@pytest.mark.parametrize("batch", [2, 12])          # the float path and the array path
def test_specserve_speculates_with_free_proposals_only(batch):
    policy = SpecServe(DEAR_DRAFT, max_k=4, probe_every=1000)
    assert policy.choose_cap(state("model", batch=batch), policy_conf(batch)) == 0
    assert policy.choose_cap(state("model+ngram", batch=batch), policy_conf(batch)) == 0
    assert policy.choose_cap(state("ngram", batch=batch), policy_conf(batch)) > 0


def test_specserve_without_a_draft_model_still_prices_ngram_steps():
    verify_only = CostModel((0.010, 1e-5, 1e-6, 0.0), None)
    policy = SpecServe(verify_only, max_k=4, probe_every=1000)
    assert policy.choose_cap(state("model"), policy_conf(2)) == 0      # nothing can draft
    assert policy.choose_cap(state("ngram"), policy_conf(2)) > 0


def test_smartspec_prices_by_drafter():
    policy = SmartSpec(DEAR_DRAFT, max_k=4, initial_acceptance=0.6)
    assert policy.best_k(state("model")) == 0
    assert policy.best_k(state("ngram")) > 0


def test_engine_labels_ngram_steps_and_learns_under_that_label():
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    engine = SpecEngine.remote(IdTokenizer(), 96, True,
                               LimitsConfig(max_model_len=256, max_num_seqs=4, max_tokens=60),
                               SpeculationConfig(num_speculative_tokens=4, policy="static",
                                                 drafter="ngram"))
    engine.cost_model = DEAR_DRAFT
    engine.speculation = SpeculationConfig(num_speculative_tokens=4, policy="specserve",
                                           drafter="ngram")
    for prompt in ([5, 6, 7, 8, 9] * 6, [10, 11, 12] * 8):
        engine.add_request(prompt, params)
    prefill = engine.plan_step()
    engine.apply_step(prefill, StepResult([5, 10], None, None), 0.01)
    plan = engine.plan_step()
    chooser = engine.chooser
    decision = chooser._in_flight[id(plan)][1]
    assert decision.drafter == "ngram"
    # Priced as one target forward, the n-gram proposals are taken although the draft
    # model's law would make any speculation a loss.
    assert all(plan.num_draft) and all(plan.fixed_drafts)
    accepted = [min(2, n) for n in plan.num_draft]
    tokens = [list(d[:a]) + [40] for d, a in zip(plan.fixed_drafts, accepted)]
    engine.apply_step(plan, StepResult([], VerifyResult(tokens, accepted, 0.01), None), 0.012)
    # What the step taught went to the n-gram statistics, not the draft model's.
    learned = chooser.policy.learned
    assert set(learned.acceptance) == {"ngram"}
