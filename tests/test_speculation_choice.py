"""The scheduler's SpeculationChooser across a plan's life: what it decided for a plan is
kept until the plan is applied or forgotten (never longer), a policy is fed only the steps
it decided, and the chosen-k counters follow the plans. No models: a planning engine and
hand-made step results."""
from __future__ import annotations

from helpers import IdTokenizer
from specserve_ray.config import LimitsConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.contracts import StepResult, VerifyResult
from specserve_ray.engine import SpecEngine

PARAMS = SamplingParams(max_tokens=60, ignore_eos=True)
# Repeating prompts: prompt lookup finds a match in every row.
PROMPTS = [[5, 6, 7, 8, 9] * 6, [10, 11, 12] * 8, [20, 21, 22, 23] * 5]


def _engine(policy: str = "threshold", drafter: str = "model+ngram") -> SpecEngine:
    spec = SpeculationConfig(num_speculative_tokens=4, policy=policy, drafter=drafter)
    engine = SpecEngine.remote(IdTokenizer(), 96, True,
                               LimitsConfig(max_model_len=256, max_num_seqs=4, max_tokens=100),
                               spec)
    for p in PROMPTS:
        engine.add_request(p, PARAMS)
    prefill = engine.plan_step()
    # Each first token continues its prompt's cycle, so prompt lookup matches next step.
    first = [p[0] for p in PROMPTS]
    engine.apply_step(prefill, StepResult(first, None, None), 0.01)
    return engine


def _result(plan) -> StepResult:
    """Every row accepts nothing and emits one token."""
    rows = len(plan.decode_ids)
    return StepResult([], VerifyResult([[40]] * rows, [0] * rows, 0.01), None)


def test_a_plans_choice_lives_until_applied_or_forgotten():
    engine = _engine(drafter="ngram")
    chooser = engine.chooser
    plan = engine.plan_step()
    assert all(plan.fixed_drafts) and all(plan.num_draft)         # n-gram drafts every row
    assert id(plan) in chooser._in_flight and id(plan) in chooser._ngram_rows
    table = chooser.ngram.ngram_acceptance.table
    assert (table == table.max()).all()             # nothing observed yet: the prior
    engine.apply_step(plan, _result(plan), 0.02)
    assert not chooser._in_flight and not chooser._ngram_rows
    # The n-gram rows' outcome (nothing accepted) reached the acceptance by match length.
    assert table.min() < table.max()
    failed = engine.plan_step()
    assert id(failed) in chooser._in_flight
    engine.forget_plan(failed)                  # its execution failed: never applied
    assert not chooser._in_flight and not chooser._ngram_rows


def test_only_the_policy_that_decided_a_step_learns_from_it():
    engine = _engine(drafter="model")
    chooser = engine.chooser
    plan = engine.plan_step()
    engine.apply_step(plan, _result(plan), 0.02)
    assert chooser._decode_steps == 1               # the deciding policy was fed
    plan = engine.plan_step()
    # A switch while the step is in flight: the new policy did not decide it.
    engine.speculation = SpeculationConfig(num_speculative_tokens=4, policy="threshold")
    engine.apply_step(plan, _result(plan), 0.02)
    assert chooser._decode_steps == 1 and not chooser._in_flight


def test_chosen_k_counters_follow_the_plans():
    engine = _engine(policy="static", drafter="model")
    chooser = engine.chooser
    for _ in range(3):
        plan = engine.plan_step()
        assert plan.num_draft == [4, 4, 4]
        engine.apply_step(plan, _result(plan), 0.02)
    assert chooser.chosen_k_counts == [0, 0, 0, 0, 9] and chooser.mean_chosen_k == 4.0
    engine.speculation = SpeculationConfig(num_speculative_tokens=2)
    assert chooser.mean_chosen_k == 0.0             # since the policy last changed
    assert engine.plan_step().num_draft == [2, 2, 2]
    assert chooser.chosen_k_counts == [0, 0, 3, 0, 9] and chooser.mean_chosen_k == 2.0
