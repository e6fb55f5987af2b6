"""The policy's in-loop rules run inside the draft worker: early stop and verify trim.

The draft worker applies `DraftControl` between its draft forwards (the worker usually
lives in another process, so the rules travel with the step plan). These tests check
the rules' effect on the worker's proposals and that output stays exactly the target's.
"""
from __future__ import annotations

import collections
import pickle

import numpy as np
import pytest
import torch

from helpers import hf_greedy, tiny_model
from helpers import GREEDY, make_engine, perturbed, random_prompts
from specserve_ray.core.rejection import PLACEHOLDER_TOKEN_ID
from specserve_ray.config import SpeculationConfig
from specserve_ray.models.runner import ModelRunner
from specserve_ray.policy import CostModel
from specserve_ray.policy.control import DraftControl
from specserve_ray.workers.draft import DraftWorker
from specserve_ray.contracts import PrefillItem, SeqSampling

SPEC_FRIENDLY = CostModel((0.01, 1e-4, 1e-5, 1e-8), (1e-4, 1e-4, 1e-5, 1e-9))


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed(target, noise=0.6)


def draft_worker(model, prompts, sampling=SeqSampling()):
    worker = DraftWorker(ModelRunner(model, 8, 256, "draft"))
    ids = [f"s{i}" for i in range(len(prompts))]
    worker.prefill([PrefillItem(s, p, sampling) for s, p in zip(ids, prompts)])
    # The first sync feeds each prompt's last token, as after a target prefill.
    return worker, ids, [[p[-1]] for p in prompts]


def test_threshold_stop_in_the_worker(pair):
    _, draft = pair
    prompts = random_prompts(6, seed=1)
    worker, ids, feed = draft_worker(draft, prompts)
    caps = [6, 6, 6, 3, 0, 6]
    control = DraftControl(stop="threshold", threshold=0.3)
    prop = worker.propose(ids, feed, caps, control)
    drafted = prop.drafted.tolist()
    conf = prop.draft_confidence
    assert prop.num_draft_tokens.tolist() == drafted            # no trim rule
    for i, (cap, n) in enumerate(zip(caps, drafted)):
        assert n <= cap and (n >= 1 or cap == 0)                # always one token if allowed
        # Went on only while the last token was confident; stopped at the first unsure one.
        assert all(float(c) >= 0.3 for c in conf[i, :max(n - 1, 0)])
        assert n == cap or float(conf[i, n - 1]) < 0.3
        assert (prop.draft_token_ids[i, n:] == PLACEHOLDER_TOKEN_ID).all()
    assert drafted != caps, "the test needs rows that stop early"


def test_budget_trim_keeps_the_most_likely_prefixes(pair):
    _, draft = pair
    prompts = random_prompts(4, seed=2)
    worker, ids, feed = draft_worker(draft, prompts)
    control = DraftControl(stop="cap", trim="budget", verify_budget=5)
    prop = worker.propose(ids, feed, [4, 4, 4, 4], control)
    verify = prop.num_draft_tokens.tolist()
    assert prop.drafted.tolist() == [4, 4, 4, 4] and sum(verify) == 5
    assert prop.draft_token_ids.shape[1] == max(verify)        # window cut to the longest row
    survival = torch.cumprod(prop.draft_confidence.double(), dim=1)
    kept = [float(survival[i, j]) for i in range(4) for j in range(verify[i])]
    dropped = [float(survival[i, j]) for i in range(4) for j in range(verify[i], 4)]
    assert min(kept) >= max(dropped)


def test_control_pickles_small():
    control = DraftControl(stop="efficiency", trim="efficiency", cost=SPEC_FRIENDLY,
                           mean_confidence=np.full(64, 0.7), context=300.0, verify_budget=40)
    blob = pickle.dumps(control)
    assert len(blob) < 2048                                     # travels with every step
    back = pickle.loads(blob)
    assert back.cost.verify_coef == SPEC_FRIENDLY.verify_coef and back.verify_budget == 40
    with pytest.raises(ValueError, match="cost model"):
        DraftControl(stop="efficiency")
    with pytest.raises(ValueError, match="unknown"):
        DraftControl(stop="sometimes")


@pytest.mark.parametrize("policy", ["specserve", "threshold:0.5"])
def test_in_loop_rules_stay_lossless(pair, policy):
    target, draft = pair
    prompts = random_prompts(5, seed=7)
    engine = make_engine(target, draft, k=5, max_seqs=8)
    engine.cost_model = SPEC_FRIENDLY
    engine.speculation = SpeculationConfig(num_speculative_tokens=5, policy=policy)
    if policy == "specserve":
        # Its subject is the in-loop rules; the made-up cost model would soon disagree with
        # what these steps measure, and specserve then drafts to its cap instead.
        engine.chooser.policy.in_loop = True
    seen = collections.Counter()
    propose = engine.draft.propose

    def recording(ids, new_tokens, caps, control=None):
        proposal = propose(ids, new_tokens, caps, control)
        for cap, n, v in zip(caps, proposal.drafted.tolist(), proposal.num_draft_tokens.tolist()):
            seen["early_stop"] += n < cap
            seen["trimmed"] += v < n
            seen["rows"] += cap > 0
        return proposal

    engine.draft.propose = recording
    outs = engine.generate(prompts, GREEDY)
    assert [o.output_ids for o in outs] == [hf_greedy(target, p, GREEDY.max_tokens)
                                            for p in prompts]
    assert seen["rows"] > 0 and seen["early_stop"] > 0, seen
    stats = engine.totals
    # Statistics count what was verified, not the caps.
    assert stats.num_draft_tokens <= engine.chooser.chosen_k_sum
