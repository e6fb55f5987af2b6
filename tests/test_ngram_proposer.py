"""Prompt-lookup proposer and its helpers: exact cases (pure numpy, no models)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from specserve_ray.contracts import Proposal
from specserve_ray.drafting.fixed import fixed_proposal, merge_fixed, model_caps, with_point_mass
from specserve_ray.drafting.ngram import (NgramAcceptance, TokenHistory, find_match, propose)


def arr(*xs):
    return np.array(xs, np.int64)


def test_longest_match_wins_over_more_recent_shorter():
    #            0  1  2  3  4  5  6  7  8  9
    t = arr(1, 2, 3, 9, 7, 3, 8, 1, 2, 3)
    # suffix [1,2,3] occurs at 0 (n=3); [3] alone also at 5 (more recent, shorter).
    m = find_match(t, 1, 4)
    assert (m.start, m.length) == (0, 3)
    assert propose(t, 3, 1, 4) == ([9, 7, 3], 3)


def test_most_recent_among_equal_lengths():
    t = arr(5, 6, 10, 5, 6, 11, 5, 6)
    assert propose(t, 2, 1, 4) == ([11, 5], 2)


def test_max_n_caps_the_match_and_min_n_rejects_short_ones():
    t = arr(1, 2, 3, 4, 50, 1, 2, 3, 4)
    assert find_match(t, 1, 2).length == 2
    assert propose(t, 1, 1, 2) == ([50], 2)
    t2 = arr(7, 8, 9, 1, 7)        # only a 1-gram match
    assert propose(t2, 2, 2, 4) == ([], 0)
    assert propose(t2, 2, 1, 4) == ([8, 9], 1)


def test_no_match_and_degenerate_inputs():
    assert propose(arr(1, 2, 3, 4), 4, 1, 4) == ([], 0)
    assert propose(arr(1), 4, 1, 4) == ([], 0)
    assert propose(arr(1, 1), 0, 1, 4) == ([], 0)


def test_copy_continues_periodically_into_its_own_proposal():
    # Period 1: "a a a" proposes a's for all k, not one token.
    assert propose(arr(4, 4, 4, 4), 5, 1, 3) == ([4, 4, 4, 4, 4], 3)
    # Period 2 run: 1 2 1 2 1 -> suffix [2,1] (n=2.. up to 4 here matches [1,2,1]).
    assert propose(arr(1, 2, 1, 2, 1), 4, 1, 4) == ([2, 1, 2, 1], 3)


def test_proposal_is_truncated_to_k():
    t = arr(1, 2, 3, 4, 5, 6, 7, 1, 2)
    assert propose(t, 3, 1, 4) == ([3, 4, 5], 2)


def test_matches_brute_force_on_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(300):
        t = rng.integers(0, 4, rng.integers(1, 40))
        for lo, hi in ((1, 4), (2, 3), (3, 5)):
            got = find_match(t, lo, hi)
            want = None
            L = len(t)
            for n in range(min(hi, L - 1), lo - 1, -1):
                starts = [i for i in range(0, L - n) if list(t[i:i + n]) == list(t[L - n:])]
                if starts:
                    want = (starts[-1], n)
                    break
            assert (None if got is None else (got.start, got.length)) == want, (t, lo, hi)


def test_token_history_grows_and_views():
    h = TokenHistory([1, 2])
    for i in range(200):
        h.extend([i])
    assert len(h) == 202 and h.view()[:3].tolist() == [1, 2, 0] and h.view()[-1] == 199


def test_cost_per_row_at_context_1024_is_well_under_0_1_ms():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 4096, 1024)      # a code-like vocabulary, context 1024
    t[-3:] = t[500:503]                  # a real match to extend
    h = TokenHistory(t.tolist())
    reps = 2000
    start = time.perf_counter()
    for _ in range(reps):
        propose(h.view(), 8, 1, 4)
    per_row = (time.perf_counter() - start) / reps
    assert per_row < 1e-4, per_row


def test_acceptance_table_learns_per_depth():
    acc = NgramAcceptance(max_n=4, max_k=4, prior=0.5, weight=0.5)
    acc.observe(3, num_drafted=4, num_accepted=1)   # depth 0 accepted, depth 1 rejected
    assert acc.confidences(3, 4) == [0.75, 0.25, 0.5, 0.5]
    assert acc.confidences(2, 2) == [0.5, 0.5]       # other match lengths untouched
    acc.observe(3, num_drafted=2, num_accepted=2)    # both accepted, no bonus depth
    assert acc.confidences(3, 3) == [0.875, 0.625, 0.5]
    assert len(acc.confidences(3, 6)) == 6


def test_fixed_rows_merge_into_a_model_proposal_and_get_point_mass():
    assert model_caps([3, 4, 2], [None, [7], []]) == [3, 0, 0]
    model = Proposal(torch.tensor([[5, 6, -1], [-1, -1, -1], [-1, -1, -1]]),
                     torch.tensor([2, 0, 0]), None, torch.tensor([[.9, .8], [0, 0], [0, 0]]),
                     0.01)
    merged = merge_fixed(model, [None, [7, 8, 9, 10], []], [None, [.5, .4, .3, .2], []])
    assert merged.draft_token_ids.tolist() == [[5, 6, -1, -1], [7, 8, 9, 10], [-1] * 4]
    assert merged.num_draft_tokens.tolist() == [2, 4, 0]
    assert merged.fixed_rows.tolist() == [False, True, True]
    assert merged.draft_confidence.shape == (3, 4)
    probs = with_point_mass(merged, [True, True, False], vocab_size=12)
    assert probs.shape == (3, 4, 12)
    assert probs[1].argmax(-1).tolist() == [7, 8, 9, 10] and float(probs[1].sum()) == 4.0
    assert float(probs[2].sum()) == 0.0 and float(probs[0].sum()) == 0.0
    assert with_point_mass(merged, [False, False, False], 12) is None
    alone = fixed_proposal([[3], None], [[.6], None])
    assert alone.draft_token_ids.tolist() == [[3], [-1]] and alone.num_draft_tokens.tolist() == [1, 0]


def test_per_drafter_stats_are_summable_and_reported():
    from specserve_ray.stats import SpecStats

    a, b = SpecStats(), SpecStats()
    a.observe(4, 2)
    a.observe_drafter("ngram", 4, 2)
    b.observe(3, 3)
    b.observe_drafter("model", 3, 3)
    b.observe_drafter("ngram", 2, 0)
    total = a.merged(b)
    assert (total.num_draft_tokens, total.num_accepted_tokens, total.num_steps) == (7, 5, 2)
    assert total.accepted_per_position == [2, 2, 1]
    summary = total.summary()["per_drafter"]
    assert summary["ngram"]["num_draft_tokens"] == 6 and summary["ngram"]["num_accepted_tokens"] == 2
    assert summary["model"]["acceptance_rate"] == 1.0
    assert "per_drafter" not in SpecStats().summary()     # per-request summaries unchanged
    copy = total.copy()
    copy.per_drafter["ngram"].observe(1, 1)
    assert total.per_drafter["ngram"].num_steps == 2


def test_planner_model_plus_ngram_follows_the_better_observed_drafter():
    from specserve_ray.drafting.planner import NgramPlanner

    hist = arr(1, 2, 3, 4, 5, 6, 1, 2)          # a 2-gram match: proposes 3, 4, 5
    planner = NgramPlanner(max_n=4, max_k=4)
    plan = planner.plan([hist, None], [3, 3], ["model+ngram", "model"], (1, 4), True)
    assert plan.drafts == [[3, 4, 5], None] and plan.match_lengths == [2, None]
    for _ in range(50):                         # the model is always right, n-grams never
        planner.observe(None, 3, 3)
        planner.observe(2, 3, 0)
    assert planner.plan([hist], [3], ["model+ngram"], (1, 4), True).drafts == [None]
    # 'ngram' keeps its proposal whatever the model does; without a model so does the mix.
    assert planner.plan([hist], [3], ["ngram"], (1, 4), True).drafts == [[3, 4, 5]]
    assert planner.plan([hist], [3], ["model+ngram"], (1, 4), False).drafts == [[3, 4, 5]]
    # No match: an empty n-gram draft (a plain step) or the model's turn.
    nomatch = arr(1, 2, 3)
    assert planner.plan([nomatch], [3], ["ngram"], (1, 4), True).drafts == [[]]
    assert planner.plan([nomatch], [3], ["model+ngram"], (1, 4), True).drafts == [None]
    # The threshold rule cuts a proposal after its first token below the threshold.
    cut = planner.plan([hist], [3], ["ngram"], (1, 4), True, threshold=0.5)
    assert cut.drafts == [[3]]
    assert planner.plan([None], [3], ["model"], (1, 4), True) is None


def test_user_config_takes_the_drafter_knobs():
    from specserve_ray.user_config import UserConfig

    knobs = UserConfig.parse({"drafter": "model+ngram", "prompt_lookup_min": 1,
                              "prompt_lookup_max": 3})
    assert (knobs.drafter, knobs.prompt_lookup_min, knobs.prompt_lookup_max) == (
        "model+ngram", 1, 3)
    with pytest.raises(ValueError, match="drafter"):
        UserConfig.parse({"drafter": "suffix"})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        UserConfig.parse({"prompt_lookup_min": 0})
