"""Pure tests of the speculation policy layer's cost side: the cost model, efficiency,
the confidence-prior verifier, the adaptive drafter, and trace replay through a
surrogate cost model (the SLO rules, baselines and learned state: test_policy_rules.py).

No models, no Ray: everything is numbers. The replay charges simulated time from a
known "true" cost law while the policies plan with a CostModel fitted to noisy profiles
of it, as a worker would at start-up (the laws: policy_sim.py).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from policy_sim import (MEMORY_BOUND, REGIMES, fitted_cost, profiled_samples, replay, state_for,
                        true_cost)
from specserve_ray.policy import (CostModel, Sample, SpecServe, brute_force_verify,
                                  expected_tokens, expected_tokens_uniform, make_policy,
                                  profile_grid, record_step, select_verify, start_drafting)
from specserve_ray.policy.drafter import should_continue
from specserve_ray.policy.efficiency import efficiency
from specserve_ray.policy.verifier import plan_efficiency, trim_to_budget


# -- cost model ----------------------------------------------------------------------------
def random_shapes(rng, n=200):
    return [(int(rng.integers(1, 65)), int(rng.integers(1, 10)), float(rng.uniform(128, 4096)))
            for _ in range(n)]


@pytest.mark.parametrize("regime", list(REGIMES))
def test_fit_recovers_linear_law(regime):
    truth, rng = true_cost(regime), np.random.default_rng(1)
    model = CostModel().fit(profiled_samples(truth, rng, noise=0.03))
    heldout = []
    for batch, per_request, context in random_shapes(rng):
        heldout.append(Sample("verify", batch, batch * per_request, context,
                              float(truth.predict_verify(batch, batch * per_request, context))))
        heldout.append(Sample("draft", batch, per_request - 1 or 1, context,
                              float(truth.predict_draft(batch, per_request - 1 or 1, context))))
    assert model.heldout_error(heldout) < 0.02          # noise-free truth, off-grid shapes
    noisy = profiled_samples(truth, rng, noise=0.03)
    assert model.heldout_error(noisy) < 0.04             # about the noise level
    assert model.draft_overhead == pytest.approx(truth.draft_overhead, rel=0.25, abs=5e-5)


def test_observe_corrects_drift():
    truth, rng = true_cost("memory-bound"), np.random.default_rng(2)
    model = CostModel().fit(profiled_samples(truth, rng, noise=0.0))
    drifted = CostModel(tuple(1.4 * c for c in MEMORY_BOUND[0]), tuple(0.8 * c for c in MEMORY_BOUND[1]))
    live = []
    for batch, per_request, context in random_shapes(rng, 80):
        live.append(Sample("verify", batch, batch * per_request, context,
                           float(drifted.predict_verify(batch, batch * per_request, context))
                           * rng.lognormal(0, 0.02)))
        live.append(Sample("draft", batch, per_request, context,
                           float(drifted.predict_draft(batch, per_request, context)) * rng.lognormal(0, 0.02)))
    heldout, online = live[:40], live[40:]
    assert model.heldout_error(heldout) > 0.2
    changed = [model.observe(s) for s in online]
    assert any(changed[:20]) and sum(changed[-40:]) <= 4     # moves early, then settles
    assert model.heldout_error(heldout) < 0.04
    assert model.scale["verify"] == pytest.approx(1.4, rel=0.04)
    assert model.scale["draft"] == pytest.approx(0.8, rel=0.04)


def test_cost_model_cache_roundtrip_and_key():
    model = fitted_cost("compute-bound")
    model.observe(Sample("verify", 8, 16, 512, 2 * float(model.predict_verify(8, 16, 512))))
    restored = CostModel.from_dict(model.to_dict())
    for shape in [(1, 1, 100.0), (16, 64, 2048.0), (64, 576, 4096.0)]:
        assert restored.predict_verify(*shape) == pytest.approx(model.predict_verify(*shape))
        assert restored.predict_draft(*shape) == pytest.approx(model.predict_draft(*shape))
    with pytest.raises(ValueError):
        CostModel.from_dict({**model.to_dict(), "format": 99})
    key = CostModel.key("org/llama 7b", "bfloat16", "cuda:0", {"torch": "2.4", "cuda": "12.4"})
    assert key == CostModel.key("org/llama 7b", "bfloat16", "cuda:0", {"cuda": "12.4", "torch": "2.4"})
    assert key != CostModel.key("org/llama 7b", "float16", "cuda:0", {"torch": "2.4", "cuda": "12.4"})
    assert "/" not in key and " " not in key


def test_profile_grid_is_bounded_and_covers_the_extremes():
    verify = profile_grid(64, 9, [256, 4096])
    assert len(verify) <= 2 * 7 * 5
    assert (64, 64 * 9, 4096.0) in verify and (1, 1, 256.0) in verify
    draft = profile_grid(48, 9, [512], kind="draft")
    assert {b for b, _, _ in draft} == {1, 2, 4, 8, 16, 32, 48}
    assert {k for _, k, _ in draft} == {1, 2, 4, 8}
    with pytest.raises(ValueError):
        profile_grid(0, 9, [512])
    with pytest.raises(ValueError):
        CostModel().fit([Sample("draft", 1, 1, 1.0, 0.001)])
    with pytest.raises(ValueError):
        Sample("prefill", 1, 1, 1.0, 0.001)


# -- efficiency ----------------------------------------------------------------------------
def test_expected_tokens_and_uniform_form():
    confidences = torch.tensor([[0.5, 0.5, 0.9], [1.0, 0.2, 0.0]])
    # Row 0 verifies 2 tokens: 0.5 + 0.25; row 1 verifies 3: 1 + 0.2 + 0.
    assert expected_tokens(confidences, [2, 3]) == pytest.approx(2 + 0.75 + 1.2)
    assert expected_tokens([[0.3]], [0]) == 1.0
    for a in (0.0, 0.3, 0.8):
        for k in range(6):
            assert expected_tokens_uniform(a, k) == pytest.approx(sum(a ** j for j in range(k + 1)))
            assert expected_tokens([[a] * max(k, 1)], [k]) == pytest.approx(expected_tokens_uniform(a, k))
    assert expected_tokens_uniform(1.0, 4) == 5.0
    assert efficiency(10.0, 0.5) == 20.0
    with pytest.raises(ValueError):
        efficiency(1.0, 0.0)


# -- confidence-prior verifier ---------------------------------------------------------------
def random_cost(rng) -> CostModel:
    verify, draft = REGIMES[rng.choice(list(REGIMES))]
    return CostModel(tuple(c * rng.uniform(0.3, 3.0) for c in verify), draft)


def test_verifier_greedy_equals_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(150):
        batch, width = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        # Mixes of near-certain, middling and hopeless drafts, ties included.
        confidences = rng.choice([0.05, 0.3, 0.5, 0.5, 0.8, 0.95, 1.0], size=(batch, width))
        if rng.random() < 0.5:
            confidences = rng.uniform(0, 1, size=(batch, width))
        num_draft = rng.integers(0, width + 1, size=batch)
        cost, context = random_cost(rng), float(rng.uniform(100, 4000))
        budget = None if rng.random() < 0.5 else int(rng.integers(0, num_draft.sum() + 1))
        fixed = float(rng.choice([0.0, rng.uniform(0, 0.02)]))
        greedy = select_verify(confidences, num_draft, cost, context,
                               verify_budget=budget, fixed_seconds=fixed)
        _, best = brute_force_verify(confidences, num_draft, cost, context,
                                     verify_budget=budget, fixed_seconds=fixed)
        assert (greedy >= 0).all() and (greedy <= num_draft).all()
        mine = plan_efficiency(confidences, greedy, cost, context, fixed)
        if budget is not None:   # budget drops come first (lowest survival): not always optimal
            assert greedy.sum() <= budget and mine <= best * (1 + 1e-12)
        else:
            assert mine == pytest.approx(best, rel=1e-12)


def test_verifier_trims_low_confidence_tails_under_compute_pressure():
    cost = true_cost("compute-bound")
    confidences = np.array([[0.95, 0.95, 0.9, 0.9], [0.3, 0.2, 0.2, 0.2]])
    kept = select_verify(confidences, [4, 4], cost, 512.0)
    # Padded verification: the weak row's tokens ride along up to the strong row's length
    # for free, so only the longest length is chosen.
    assert kept[0] >= 2 and kept[1] == kept[0]
    assert list(select_verify(confidences, [4, 1], cost, 512.0)) == [kept[0], 1]
    weak = np.array([[0.1, 0.2, 0.2, 0.2], [0.1, 0.2, 0.2, 0.2]])
    assert list(select_verify(weak, [4, 4], cost, 512.0)) == [0, 0]
    assert list(trim_to_budget(confidences, [4, 4], 3)) == [3, 0]
    assert list(trim_to_budget(confidences, [4, 4], None)) == [4, 4]
    assert list(select_verify(np.zeros((2, 0)), [0, 0], cost, 512.0)) == [0, 0]


# -- adaptive drafter ----------------------------------------------------------------------
def run_draft_loop(cost, mean_confidence, max_k, context, step_confidence):
    progress = start_drafting(max_k)
    while (rows := should_continue(progress, mean_confidence, cost, context)).any():
        progress = record_step(progress, step_confidence, rows)
    return progress


@pytest.mark.parametrize("regime", ["memory-bound", "compute-bound", "overhead-heavy"])
def test_drafter_stops_where_predicted_efficiency_peaks(regime):
    # Overhead-heavy: one draft call costs 6 ms however long, so E(1) < E(0) while deeper
    # drafts pay; the lookahead must still find the peak.
    cost = (CostModel((4e-3, 1e-5, 2e-5, 1e-9), (6e-3, 2e-4, 1e-5, 0.0))
            if regime == "overhead-heavy" else true_cost(regime))
    for batch, confidence, max_k in itertools.product([1, 4, 16], [0.3, 0.6, 0.8, 0.97], [3, 8]):
        context = 700.0
        # The rule's own prediction: c_(j+1) = c_j * m, uniform over rows.
        depths = np.arange(max_k + 1)
        expected = batch * expected_tokens_uniform(confidence, depths)
        seconds = cost.predict_draft(batch, depths, context) + cost.predict_verify(
            batch, batch * (depths + 1), context)
        peak = int(np.argmax(expected / seconds))
        progress = run_draft_loop(cost, confidence, [max_k] * batch, context, np.full(batch, confidence))
        assert set(progress.num_drafted.tolist()) == {peak}, (batch, confidence, max_k)


def test_drafter_reacts_to_real_confidences_and_picks_rows():
    # Each drafting row costs 2 ms of draft time, so a hopeless row is not worth it while
    # a confident one is (verification, memory-bound and padded, barely notices either).
    cost = CostModel(MEMORY_BOUND[0], (5e-4, 1.5e-3, 2e-3, 0.0))
    # Prediction says go on (m = 0.9), but row 1's real draft becomes unsure at step 2.
    progress = start_drafting([6, 6])
    real = [np.array([0.9, 0.9]), np.array([0.9, 0.02])]
    for confidences in real:
        rows = should_continue(progress, 0.9, cost, 500.0)
        assert rows.all()
        progress = record_step(progress, confidences, rows)
    rows = should_continue(progress, 0.9, cost, 500.0)
    assert list(rows) == [True, False]
    assert progress.active_counts == (2, 2) and list(progress.num_drafted) == [2, 2]
    assert progress.cumulative_confidence == pytest.approx([0.81, 0.018])
    progress = record_step(progress, np.array([0.9, 0.9]), rows)
    assert list(progress.active) == [True, False]              # a stopped row never resumes
    assert list(progress.confidences[1]) == pytest.approx([0.9, 0.02, 0, 0, 0, 0])
    # A mixed batch: only the confident rows draft (each row costs draft time; padded
    # verification would take a weak row's extra tokens almost for free).
    mixed = should_continue(start_drafting([4] * 4), np.array([0.95, 0.1, 0.95, 0.1]),
                            cost, 500.0)
    assert list(mixed) == [True, False, True, False]


# -- trace replay ---------------------------------------------------------------------------
BATCHES = {1: 500, 4: 200, 16: 80, 64: 40}       # batch size -> tokens per slot
BASELINES = ["none"] + [f"static:{k}" for k in range(1, 9)]


@pytest.fixture(scope="module")
def replay_results():
    results = {}
    for regime in REGIMES:
        truth = true_cost(regime)
        for batch, tokens in BATCHES.items():
            for name in BASELINES + ["specserve"]:
                results[regime, batch, name] = replay(make_policy(name, fitted_cost(regime)),
                                                      truth, batch, tokens)
    return results


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_specserve_matches_or_beats_every_static_k(replay_results, regime, batch):
    ours, mean_k = replay_results[regime, batch, "specserve"]
    table = {name: replay_results[regime, batch, name][0] for name in BASELINES}
    best = max(table, key=table.get)
    print(f"\n{regime:13s} B={batch:2d}: specserve {ours:9.1f} tok/s (mean k {mean_k:.2f}); "
          f"best baseline {best} {table[best]:9.1f} ({ours / table[best]:.3f}x)")
    for name, tokens_per_second in table.items():
        assert ours >= 0.97 * tokens_per_second, (name, tokens_per_second, ours)


def test_speculation_shrinks_at_large_batch_when_compute_bound(replay_results):
    assert replay_results["compute-bound", 1, "specserve"][1] > 0.5
    # Probes (k = 1 now and then) keep measuring what plain decoding forgoes.
    assert replay_results["compute-bound", 64, "specserve"][1] < 0.15
    policy = SpecServe(fitted_cost("compute-bound"))
    assert policy.decide(state_for(1, 0.9)).speculates
    assert not policy.decide(state_for(64, 0.9)).speculates
    assert SpecServe(fitted_cost("memory-bound")).decide(state_for(64, 0.9)).speculates
