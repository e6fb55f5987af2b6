"""Trace replay through surrogate cost laws: SpecServe learns what the model gets wrong.

Two failure modes of the earlier policy, each replayed through tests/policy_sim.py (the
policy's real step protocol, simulated time from a "true" cost law):

* the k = 0 trap: a draft whose reported confidences (0.3) understate its acceptance
  (0.69) was never drafted again once plain decoding was chosen, so nothing was learned;
* a cost model profiled where verification is cheap (memory-bound, small batches) kept
  speculating at a load where verifying extra tokens had stopped paying.

Here exploration (probe steps) and the observed-goodput correction must recover: the
adaptive policy ends at or above every static k, speculating at light load and backing
off to k = 0/1 under load. The ablations show the same replay without them fails.
"""
from __future__ import annotations

import numpy as np
import pytest

from policy_sim import make_traces, replay
from specserve_ray.policy import CostModel, Sample, SpecServe, make_policy, profile_grid

# k = 1 pays iff acceptance > 0.55: E(1) = (1 + a) / 15.5 ms vs E(0) = 1 / 10 ms.
MARGINAL = CostModel((0.010, 0.0, 0.0, 0.0), (0.0, 0.0055, 0.0, 0.0))
MEMORY_BOUND = ((0.020, 2e-5, 1e-5, 1e-8), (5e-4, 1.5e-3, 1e-5, 2e-9))
COMPUTE_BOUND = ((2e-3, 1e-5, 4e-4, 2e-8), (3e-4, 3e-4, 4e-5, 1e-9))
STATIC = ["none"] + [f"static:{k}" for k in range(1, 9)]


def under_confident(batch: int, length: int, acceptance: float = 0.69, shown: float = 0.3,
                    seed: int = 0):
    rng = np.random.default_rng(seed)
    accept = rng.random((batch, length)) < acceptance
    return (np.full((batch, length), acceptance), accept, np.full(batch, 200)), \
        np.full((batch, length), shown)


@pytest.mark.parametrize("batch", [1, 4])
def test_k0_trap_recovers_through_probes(batch):
    traces, shown = under_confident(batch, 1200)
    history: list = []
    policy = SpecServe(MARGINAL, max_k=4)
    ours, _ = replay(policy, MARGINAL, batch, 300, traces=traces, reported_conf=shown,
                     history=history)
    assert max(history[0]) == 0                      # the start: plain decoding chosen
    late = history[len(history) // 2:]
    assert np.mean([max(ks) >= 1 for ks in late]) > 0.8, "never escaped k = 0"
    assert policy.learned.prior() == pytest.approx(0.69, abs=0.08)
    static1, _ = replay(make_policy("static:1", MARGINAL), MARGINAL, batch, 300,
                        traces=traces, reported_conf=shown)
    plain, _ = replay(make_policy("none", MARGINAL), MARGINAL, batch, 300, traces=traces,
                      reported_conf=shown)
    assert ours >= 0.97 * static1 and ours > plain
    # Without probes (the old behaviour) the estimate never moves and k stays 0.
    stuck: list = []
    replay(SpecServe(MARGINAL, max_k=4, probe_every=10 ** 9), MARGINAL, batch, 300,
           traces=traces, reported_conf=shown, history=stuck)
    assert all(max(ks) == 0 for ks in stuck)


def profiled_where_verification_is_cheap() -> CostModel:
    """Fitted from a profile of batches <= 8 on a memory-bound machine: it believes
    extra verified tokens are nearly free at any batch."""
    truth, rng = CostModel(*MEMORY_BOUND), np.random.default_rng(0)
    samples = []
    for kind in ("verify", "draft"):
        for batch, tokens, context in profile_grid(8, 9, (256, 1024), kind):
            law = truth.predict_verify if kind == "verify" else truth.predict_draft
            samples.append(Sample(kind, batch, tokens, context,
                                  float(law(batch, tokens, context)) * rng.lognormal(0, 0.03)))
    return CostModel().fit(samples)


@pytest.fixture(scope="module")
def load_replays():
    """Acceptance high (easy text) at light load; verification expensive at high load."""
    truth = CostModel(*COMPUTE_BOUND)
    out = {}
    for batch, tokens in ((1, 400), (64, 400)):
        traces = make_traces(batch, 2 * tokens + 64, seed=batch, easy_run=80, hard_run=10)
        for name in STATIC + ["specserve", "specserve-uncorrected"]:
            if name.startswith("specserve"):
                policy = SpecServe(profiled_where_verification_is_cheap(),
                                   correct_goodput=name == "specserve")
            else:
                policy = make_policy(name, None)
            out[batch, name] = replay(policy, truth, batch, tokens, traces=traces)
    return out


@pytest.mark.parametrize("batch", [1, 64])
def test_adaptive_beats_every_static_k_with_a_wrong_cost_model(load_replays, batch):
    ours, mean_k = load_replays[batch, "specserve"]
    table = {name: load_replays[batch, name][0] for name in STATIC}
    best = max(table, key=table.get)
    print(f"\nB={batch}: specserve {ours:.1f} tok/s (mean k {mean_k:.2f}); best static "
          f"{best} {table[best]:.1f}; uncorrected {load_replays[batch, 'specserve-uncorrected'][0]:.1f}")
    for name, value in table.items():
        assert ours >= 0.97 * value, (name, value, ours)


def test_speculates_at_light_load_and_backs_off_under_load(load_replays):
    assert load_replays[1, "specserve"][1] > 1.0
    assert load_replays[64, "specserve"][1] <= 1.0
    # The model alone (no observed-goodput correction) keeps speculating at load and loses.
    uncorrected, uncorrected_k = load_replays[64, "specserve-uncorrected"]
    best = max(load_replays[64, name][0] for name in STATIC)
    assert uncorrected_k > load_replays[64, "specserve"][1] and uncorrected < 0.9 * best
