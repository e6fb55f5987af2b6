"""Chunked prefill under a token budget is exact: greedy output is identical whatever the
budget, whatever else shares the step (prompt chunks ride in the verification's forward,
models/flat_forward.py), for prompts far longer than the budget; seeded sampling is the
same with or without that shared forward; a request aborted mid-prompt frees its slots;
decode rows are never starved nor do they starve arrivals; a step with no decode row
prefills up to its own (idle) budget."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import hf_greedy, tiny_model
from specserve_ray.config import LimitsConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.core.ragged import group_by_length
from specserve_ray.engine import SpecEngine
from specserve_ray.models.runner import ModelRunner
from specserve_ray.workers.draft import DraftWorker
from specserve_ray.workers.host import run_draft, run_target
from specserve_ray.workers.target import TargetWorker


class IdTokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def models():
    target = tiny_model("llama", seed=0)
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15 * p.std().clamp(min=1e-3))
    return target, draft


def _engine(models, budget, k=3, max_seqs=6, idle=None, flat=True, drafter="model"):
    target, draft = models
    limits = LimitsConfig(max_model_len=256, max_num_seqs=max_seqs, max_tokens=200,
                          max_num_batched_tokens=budget, max_prefill_tokens_idle=idle)
    target_runner = ModelRunner(target, max_seqs, 256, "target")
    assert target_runner.flat, "the tiny Llama takes the flat forward"
    target_runner.flat = flat
    return SpecEngine(TargetWorker(target_runner),
                      DraftWorker(ModelRunner(draft, max_seqs, 256, "draft")),
                      IdTokenizer(), limits,
                      SpeculationConfig(num_speculative_tokens=k, drafter=drafter))


def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


class _CountingRunner:
    """Counts the target's shared (prefill + verify) forwards."""

    def __init__(self, worker):
        self.calls = 0
        original = worker.prefill_and_verify

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        worker.prefill_and_verify = counted


@pytest.mark.parametrize("budget,idle,flat,drafter", [
    (None, None, True, "model"), (7, None, True, "model"), (16, None, True, "model"),
    (40, None, True, "model"), (16, None, False, "model"), (16, 64, True, "model"),
    (16, None, True, "ngram"), (9, None, True, "model+ngram")])
def test_greedy_identical_whatever_the_budget(models, budget, idle, flat, drafter):
    """Staggered arrivals, so prompt chunks share steps with decoding rows (the shared
    forward), across chunk boundaries, prompts far longer than the budget."""
    target, _ = models
    lengths = [150, 3, 61, 17, 90, 33]
    prompts = _prompts(budget or 1, lengths)
    # Repetitive prompts give the n-gram drafter matches to propose.
    prompts[2] = (prompts[2][:10] * 7)[:61]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine = _engine(models, budget, idle=idle, flat=flat, drafter=drafter)
    counter = _CountingRunner(engine.target)
    ids, outputs = [], {}
    for prompt in prompts:                       # one arrival per step, while others decode
        ids.append(engine.add_request(prompt, params))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    for rid, prompt in zip(ids, prompts):
        assert outputs[rid] == hf_greedy(target, prompt, 12)
    assert engine.target.runner.num_seqs() == 0 and engine.draft.runner.num_seqs() == 0
    if flat and budget is not None:
        assert counter.calls >= 3, "prompt chunks must have shared steps with decode rows"
    if not flat:
        assert counter.calls == 0


def test_seeded_sampling_same_with_or_without_the_shared_forward(models):
    """The shared forward changes no sampled token: same seeds, same outputs."""
    prompts = _prompts(21, [70, 5, 44, 120])
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=s,
                             ignore_eos=True) for s in range(len(prompts))]
    runs = []
    for flat in (True, False):
        engine = _engine(models, 16, flat=flat)
        outputs = {}
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, params[i], request_id=f"r{i}")
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        while engine.has_unfinished():
            for out in engine.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        runs.append(outputs)
    assert runs[0] == runs[1]
    assert all(len(v) == 10 for v in runs[0].values())


def test_idle_budget_only_when_nothing_decodes(models):
    """A step with no decode row prefills up to max_prefill_tokens_idle; once a request
    decodes, steps are back under max_num_batched_tokens."""
    engine = _engine(models, budget=16, idle=64, k=2)
    first, second = _prompts(13, [150, 150])
    rid = engine.add_request(first, SamplingParams(max_tokens=30, ignore_eos=True))
    plan = engine.plan_step()
    assert not plan.decode_ids and sum(len(p.prompt_ids) for p in plan.prefill) == 64
    engine.apply_step(plan, run_target(engine.target, run_draft(engine.draft, plan)), 0.0)
    while not engine.running[0].prefill_done:
        engine.step()
    engine.add_request(second, SamplingParams(max_tokens=4, ignore_eos=True))
    # With pipelining the decoding request may be in the other step in flight: this plan
    # then has no decode row, yet someone decodes, so the decode budget still holds.
    busy_plan = engine.plan_step(busy={rid})
    assert not busy_plan.decode_ids and sum(len(p.prompt_ids) for p in busy_plan.prefill) <= 16
    engine.apply_step(busy_plan, run_target(engine.target, run_draft(engine.draft, busy_plan)),
                      0.0)
    plan = engine.plan_step()
    assert plan.decode_ids
    assert sum(k + 1 for k in plan.num_draft) + sum(len(p.prompt_ids) for p in plan.prefill) <= 16


def test_budget_bounds_every_step_and_decoding_goes_on(models):
    """While a long prompt is prefilled chunk by chunk, the running request keeps decoding
    every step, and no step schedules more than the budget (prefill gets >= a quarter)."""
    engine = _engine(models, budget=16, k=3)
    short, long = _prompts(5, [4, 200])
    engine.add_request(short, SamplingParams(max_tokens=60, ignore_eos=True))
    engine.step()                                            # short is prefilled
    engine.add_request(long, SamplingParams(max_tokens=4, ignore_eos=True))
    chunks = 0
    while engine.running and not engine.running[-1].prefill_done or len(engine.running) < 2:
        plan = engine.plan_step()
        tokens = sum(k + 1 for k in plan.num_draft) + sum(len(p.prompt_ids) for p in plan.prefill)
        assert tokens <= 16 + 4                 # decode rows + prefill's guaranteed quarter
        assert plan.decode_ids, "the running request must decode in every step"
        assert all(len(p.prompt_ids) <= 16 for p in plan.prefill)
        chunks += len(plan.prefill)
        engine.apply_step(plan, run_target(engine.target, run_draft(engine.draft, plan)), 0.0)
    assert chunks >= 200 // 16


def test_abort_mid_prompt_frees_slots(models):
    engine = _engine(models, budget=8)
    (prompt,) = _prompts(9, [100])
    rid = engine.add_request(prompt, SamplingParams(max_tokens=5))
    engine.step()
    engine.step()
    assert engine.target.runner.num_seqs() == 1 and not engine.running[0].prefill_done
    assert engine.abort(rid)
    assert engine.target.runner.num_seqs() == 0 and engine.draft.runner.num_seqs() == 0
    assert engine.generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True))[0].output_ids \
        == hf_greedy(models[0], prompt, 5)


def test_group_by_length_bounds_padding():
    lengths = [100, 3, 97, 50, 48, 1, 90]
    groups = group_by_length(lengths, max_padding=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width = max(lengths[i] for i in g)
        assert width * len(g) <= 1.25 * sum(lengths[i] for i in g)
    assert len(group_by_length([10] * 5)) == 1
