"""Prompt-lookup (n-gram) drafting is lossless through the whole engine.

Greedy: output equals Hugging Face greedy on the target alone, token for token, with the
n-gram drafter alone (no draft model at all) and combined with the model, on prompts that
repeat so that matches, acceptances and rejections all really occur. Sampled: the 2nd and
3rd output tokens follow the target's exact marginals while n-gram proposals (point-mass
draft distributions) are verified, and seeded requests reproduce.
"""
from __future__ import annotations

import pytest
import torch

from helpers import hf_greedy, tiny_model
from specserve_ray.config import LimitsConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.engine import SpecEngine
from specserve_ray.errors import RequestError
from specserve_ray.models.runner import ModelRunner
from specserve_ray.workers.draft import DraftWorker
from specserve_ray.workers.target import TargetWorker
from helpers import IdTokenizer, perturbed, random_prompts
from test_engine_sampling import empirical, exact_marginals, tv, tv_bound


def ngram_engine(target, draft, drafter: str, k: int = 4, max_seqs: int = 8,
                 lookup=(1, 4)) -> SpecEngine:
    limits = LimitsConfig(max_model_len=256, max_num_seqs=max_seqs, max_tokens=200)
    spec = SpeculationConfig(num_speculative_tokens=k, drafter=drafter,
                             prompt_lookup_min=lookup[0], prompt_lookup_max=lookup[1])
    return SpecEngine(TargetWorker(ModelRunner(target, max_seqs, 256, "target")),
                      DraftWorker(ModelRunner(draft, max_seqs, 256, "draft"))
                      if draft is not None else None, IdTokenizer(), limits, spec)


def repeating_prompts(n: int, seed: int):
    """A random phrase said three times: the natural continuation is to copy it again."""
    return [(p * 3)[:60] for p in random_prompts(n, seed=seed)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    target = tiny_model(request.param, seed=0)
    return target, perturbed(target, noise=0.15)


GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_ngram_without_draft_model_greedy_equals_target_only(pair, k):
    target, _ = pair
    engine = ngram_engine(target, None, "ngram", k=k)
    prompts = repeating_prompts(3, seed=k) + random_prompts(1, seed=k)
    for prompt in prompts:
        assert engine.generate([prompt], GREEDY)[0].output_ids == hf_greedy(target, prompt, 32)
    ngram = engine.totals.per_drafter["ngram"]
    # Matches occurred and were verified both ways (a test of a drafter that never drafts
    # or is always right would prove nothing).
    assert 0 < ngram.num_accepted_tokens < ngram.num_draft_tokens
    assert "model" not in engine.totals.per_drafter


def test_model_plus_ngram_batched_greedy_equals_target_only(pair):
    target, draft = pair
    engine = ngram_engine(target, draft, "model+ngram", k=4, lookup=(2, 4))
    prompts = repeating_prompts(4, seed=5) + random_prompts(4, seed=5)
    outs = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.output_ids == hf_greedy(target, prompt, 32)
    per = engine.totals.per_drafter
    # Both drafters really ran: n-gram where a 2-gram matched, the model elsewhere.
    assert per["ngram"].num_draft_tokens > 0 and per["model"].num_draft_tokens > 0
    assert per["ngram"].num_accepted_tokens > 0 and per["model"].num_accepted_tokens > 0


def test_per_request_drafter_mixes_in_one_batch(pair):
    target, draft = pair
    engine = ngram_engine(target, draft, "model", k=3)
    prompts = repeating_prompts(3, seed=9)
    params = [GREEDY.model_copy(update={"drafter": d}) for d in ("ngram", "model", None)]
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.output_ids == hf_greedy(target, prompt, 32)
    assert engine.totals.per_drafter["ngram"].num_draft_tokens > 0
    assert engine.totals.per_drafter["model"].num_draft_tokens > 0


def test_drafter_model_without_draft_model_is_a_request_error(pair):
    target, _ = pair
    engine = ngram_engine(target, None, "ngram")
    with pytest.raises(RequestError, match="drafter 'model' needs a draft model"):
        engine.add_request([5, 6, 7], GREEDY.model_copy(update={"drafter": "model"}))
    with pytest.raises(ValueError, match="drafter"):
        SamplingParams(drafter="suffix")


@pytest.mark.parametrize("drafter", ["ngram", "model+ngram"])
def test_sampled_tokens_follow_target_distribution_with_point_mass_drafts(drafter):
    target = tiny_model("llama", seed=11, scale=1.6)
    draft = perturbed(target, noise=0.5, seed=3) if drafter == "model+ngram" else None
    # Every vocabulary token once (ngram: the first output token always matches; with
    # model+ngram only half of them, so rows switch), then the target's own greedy text
    # (it repeats itself), so the most recent matches copy tokens that are often inside
    # the sampled support: acceptance is frequent and a wrong draft distribution shows.
    start = random_prompts(1, seed=11)[0]
    perm = (torch.randperm(93, generator=torch.Generator().manual_seed(4)) + 3).tolist()
    prompt = (perm if draft is None else perm[:46]) + start + hf_greedy(target, start, 40)
    n = 1500
    temperature, top_k, top_p = 1.0, 6, 1.0
    engine = ngram_engine(target, draft, drafter, k=2, max_seqs=32, lookup=(1, 3))
    params = [SamplingParams(max_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=i, ignore_eos=True) for i in range(n)]
    outs = engine.generate([prompt] * n, params)
    marg2, marg3 = exact_marginals(target, prompt, temperature, top_k, top_p)
    vocab = marg2.numel()
    for name, samples, exact in (("t2", [o.output_ids[1] for o in outs], marg2),
                                 ("t3", [o.output_ids[2] for o in outs], marg3)):
        bound = tv_bound(exact, n)
        assert tv(empirical(samples, vocab), exact) < bound, (name, bound)
    ngram = engine.totals.per_drafter["ngram"]
    assert 0 < ngram.num_accepted_tokens < ngram.num_draft_tokens
    if draft is not None:
        assert engine.totals.per_drafter["model"].num_draft_tokens > 0


def test_point_mass_is_needed_for_sampled_rows():
    """The same fixed drafts verified with an all-zero draft distribution (what the target
    assumes when nobody supplies one) would be accepted whenever the target allows them:
    the check above has the power to see a missing point mass."""
    from specserve_ray.core.rejection import rejection_sample

    vocab, rows = 6, 4000
    target_probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02]).repeat(rows, 2, 1)
    drafts = torch.full((rows, 1), 3)
    args = (drafts, torch.ones(rows, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(rows, 1, generator=g)
    noise = torch.empty(rows, vocab).exponential_(generator=g)
    one_hot = torch.nn.functional.one_hot(drafts, vocab).float()
    out, _ = rejection_sample(*args, one_hot, target_probs, target_probs.argmax(-1),
                              torch.zeros(rows, dtype=torch.bool), uniform, noise)
    first = empirical(out[:, 0].tolist(), vocab)
    assert tv(first, target_probs[0, 0]) < tv_bound(target_probs[0, 0], rows)
    wrong, _ = rejection_sample(*args, torch.zeros_like(one_hot), target_probs,
                                target_probs.argmax(-1), torch.zeros(rows, dtype=torch.bool),
                                uniform, noise)
    assert float(empirical(wrong[:, 0].tolist(), vocab)[3]) == 1.0


def test_seeded_ngram_sampling_reproduces():
    target = tiny_model("qwen2", seed=12, scale=1.3)
    prompts = repeating_prompts(3, seed=12)

    def run(seed_base, neighbours=0):
        engine = ngram_engine(target, None, "ngram", k=3)
        params = [SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=seed_base + i,
                                 ignore_eos=True) for i in range(3)]
        extra = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)] * neighbours
        outs = engine.generate(prompts + prompts[:neighbours], params + extra)
        return [o.output_ids for o in outs[:3]]

    first = run(0)
    assert first == run(0) == run(0, neighbours=2)
    assert first != run(100)


def test_threshold_policy_stops_ngram_proposals_by_their_confidence(pair):
    target, _ = pair
    prompts = repeating_prompts(2, seed=21)
    counts = {}
    for policy in ("static", "threshold:0.99"):
        engine = ngram_engine(target, None, "ngram", k=6)
        engine.speculation = engine.speculation.model_copy(update={"policy": policy})
        outs = engine.generate(prompts, GREEDY)
        for prompt, out in zip(prompts, outs):
            assert out.output_ids == hf_greedy(target, prompt, 32)
        ngram = engine.totals.per_drafter["ngram"]
        counts[policy] = (ngram.num_draft_tokens, ngram.num_drafts)
    # No n-gram token is believed 99% likely: every proposal is cut to its first token.
    drafted, steps = counts["threshold:0.99"]
    assert drafted == steps > 0
    assert counts["static"][0] > counts["static"][1]


def test_lookup_sizes_are_validated():
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculationConfig(drafter="ngram", prompt_lookup_min=5, prompt_lookup_max=3)
    with pytest.raises(ValueError):
        SpeculationConfig(drafter="suffix")
