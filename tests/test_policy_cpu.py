"""The policy's per-step paths on floats decide exactly as the numpy ones (pure, fast).

SpecServe decides and learns every step; for small batches it runs on plain floats
(cap_goodput.py, the float twins in cost_model.py, list counts in learned.py and
calibration.py) because numpy's per-call cost on 1-9 element arrays was most of its CPU
per step (scripts/bench_policy_cpu.py). Each float path is checked here for *equality*,
not closeness, against the numpy computation it replaces (the previous implementation,
kept here as the reference where it left the package), on random inputs; and the whole
policy, run both ways through the same replay, makes the same decisions step for step.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from policy_sim import make_traces, replay
from specserve_ray.policy import BatchState, CostModel, SpecServe, specserve
from specserve_ray.policy.calibration import ConfidenceCalibration, apply_table
from specserve_ray.policy import calibration, contracts
from specserve_ray.policy.cap_goodput import (best_cap, cap_outlook, first_max,
                                              predicted_goodput, slo_feasible_k)
from specserve_ray.policy.contracts import update_confidence_ema, update_confidence_floats
from specserve_ray.policy.learned import DepthAcceptance, GoodputCorrection, _MAX_LOG_RATIO

RNG_SEEDS = range(6)


def random_cost(rng, draft=True) -> CostModel:
    verify = rng.uniform(0, 1, 5) * np.array([1e-2, 1e-4, 3e-4, 3e-6, 1e-8])
    verify[rng.random(5) < 0.2] = 0.0
    cost = CostModel(tuple(verify), tuple(rng.uniform(0, 1, 4) * np.array([1e-3, 3e-4, 3e-5, 6e-8]))
                     if draft else None)
    cost.scale = {"verify": float(rng.uniform(0.5, 2)), "draft": float(rng.uniform(0.5, 3))}
    cost.step_overhead = float(rng.uniform(0, 0.01))
    return cost


# -- cost law: float twins ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_step_seconds_equal_predict_step(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        cost = random_cost(rng, draft=bool(rng.random() < 0.8))
        batch, context = int(rng.integers(0, 70)), float(rng.uniform(0, 4000))
        widths = [int(w) for w in rng.integers(0, 9, size=int(rng.integers(1, 10)))]
        expected = np.asarray(cost.predict_step(batch, np.array(widths), context)).tolist()
        assert cost.step_seconds(batch, widths, context) == expected
        k = widths[0]
        assert cost.verify_seconds(batch, batch * (k + 1), context) == \
            float(cost.predict_verify(batch, batch * (k + 1), context))
        if cost.has_draft:
            rows = float(rng.uniform(0, 8))     # draft samples carry a mean row count
            assert cost.draft_seconds(rows, k, context) == \
                float(cost.predict_draft(rows, k, context))


# -- the cap decision ----------------------------------------------------------------------------
def random_state(rng, batch: int, max_k: int, slo: bool):
    caps = tuple(int(c) for c in rng.integers(0, max_k + 1, size=batch))
    if rng.random() < 0.5:
        caps = (max_k,) * batch
    budgets = slack = None
    if slo:
        budgets = tuple(float(b) for b in rng.uniform(0.002, 0.05, size=batch))
        if rng.random() < 0.3:      # some requests without a budget
            budgets = tuple(math.inf if rng.random() < 0.5 else b for b in budgets)
        slack = tuple(float(s) for s in rng.uniform(-0.05, 0.05, size=batch))
    return BatchState(tuple(int(c) for c in rng.integers(10, 3000, size=batch)), caps,
                      tuple(float(c) for c in rng.uniform(0, 1, size=batch)),
                      tpot_budget_s=budgets, tpot_slack_s=slack)


def numpy_cap(tokens, seconds, goodput, state) -> int:
    """SpecServe.choose_cap's rule on arrays (its large-batch path)."""
    if state.tpot_budget_s is not None:
        fits, worst = slo_feasible_k(seconds, tokens, state.tpot_budget_s, state.tpot_slack_s)
        if not fits.any():
            return int(np.argmin(worst))
        goodput = np.where(fits, goodput, -np.inf)
    return int(np.argmax(goodput))


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_cap_outlook_and_best_cap_equal_the_numpy_decision(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        batch, max_k = int(rng.integers(1, 17)), int(rng.integers(1, 9))
        state = random_state(rng, batch, max_k, slo=bool(rng.random() < 0.5))
        cost = random_cost(rng)
        depth = None if rng.random() < 0.2 else \
            np.concatenate([[1.0], rng.uniform(0.1, 1.5, max_k - 1)])
        confidence = state.confidence(0.5)
        tokens, seconds, goodput = predicted_goodput(cost, state, confidence, max_k, depth)
        f_tokens, f_seconds, f_goodput = cap_outlook(
            cost, batch, state.caps.tolist(), state.max_context, confidence.tolist(),
            None if depth is None else depth.tolist(), max_k)
        assert [list(row) for row in zip(*f_tokens)] == tokens.tolist()
        assert f_seconds == seconds.tolist()
        assert f_goodput == goodput.tolist()
        assert best_cap(f_tokens, f_seconds, f_goodput, state.tpot_budget_s, state.tpot_slack_s) \
            == numpy_cap(tokens, seconds, goodput, state)


def test_first_max_is_numpy_argmax():
    rng = np.random.default_rng(0)
    for _ in range(500):
        values = rng.integers(0, 4, size=int(rng.integers(1, 9))).astype(float)   # ties
        if rng.random() < 0.2:
            values[int(rng.integers(values.size))] = -np.inf
        assert first_max(values.tolist()) == int(np.argmax(values))
    assert first_max([1.0, float("nan"), 3.0]) == int(np.argmax([1.0, np.nan, 3.0]))


# -- what is learned every step -------------------------------------------------------------------
def reference_factors(cells: dict, max_k: int) -> np.ndarray:
    """GoodputCorrection.factors as it was on arrays (np.interp + end-slope extension)."""
    seen = sorted(cells.items())
    ks = np.arange(max_k + 1)
    if not seen:
        return np.ones(max_k + 1)
    xs = np.array([k for k, _ in seen], np.float64)
    ys = np.array([v for _, v in seen])
    values = np.interp(ks, xs, ys)
    if len(seen) >= 2:
        low = (ys[1] - ys[0]) / (xs[1] - xs[0])
        high = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        values = np.where(ks < xs[0], ys[0] + low * (ks - xs[0]), values)
        values = np.where(ks > xs[-1], ys[-1] + high * (ks - xs[-1]), values)
    return np.exp(np.clip(values, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_goodput_factors_and_spread_follow_every_observation(seed):
    """The per-bucket index behind factors/spread is kept by observe and load: after
    every observation they equal what the cells (log_ratio) say."""
    rng = np.random.default_rng(seed)
    goodput = GoodputCorrection()
    for _ in range(300):
        batch, k = int(rng.integers(1, 20)), int(rng.integers(0, 9))
        goodput.observe(batch, k, 1.0, float(rng.lognormal(0, 0.6)))
        probe = int(rng.integers(1, 20))
        bucket = math.ceil(math.log2(probe))
        cells = {kk: v for (b, kk), v in goodput.log_ratio.items() if b == bucket}
        max_k = int(rng.integers(0, 10))
        assert goodput.factors(probe, max_k).tolist() == reference_factors(cells, max_k).tolist()
        values = list(cells.values())
        assert goodput.spread(probe) == (max(values) - min(values) if len(values) >= 2 else 0.0)
    loaded = GoodputCorrection()
    loaded.load(goodput.to_dict())
    for probe in (1, 2, 3, 5, 9, 17):
        assert loaded.factors(probe, 8).tolist() == \
            reference_factors({k: v for (b, k), v in loaded.log_ratio.items()
                               if b == math.ceil(math.log2(probe))}, 8).tolist()


def reference_depth(verified_steps, accepted_steps, max_k: int) -> tuple[list, list, list]:
    """DepthAcceptance as it was on arrays: (tested, accepted, depth profile)."""
    depth_cap, decay, prior_rate, prior_weight = 16, 0.995, 0.5, 2.0
    tested, hits = np.zeros(depth_cap), np.zeros(depth_cap)
    for num_verified, num_accepted in zip(verified_steps, accepted_steps):
        verified = np.minimum(np.asarray(num_verified, np.int64), depth_cap)
        accepted = np.minimum(np.asarray(num_accepted, np.int64), verified)
        if verified.size == 0 or verified.max(initial=0) == 0:
            continue
        depth = np.arange(depth_cap)[None, :]
        tested *= decay
        hits *= decay
        tested += (depth < np.minimum(verified, accepted + 1)[:, None]).sum(axis=0)
        hits += (depth < accepted[:, None]).sum(axis=0)
    rates = np.array([float((hits[min(j, 15)] + prior_weight * prior_rate)
                            / (tested[min(j, 15)] + prior_weight)) for j in range(max_k)])
    return tested.tolist(), hits.tolist(), (rates / max(rates[0], 1e-6)).tolist()


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_depth_acceptance_counts_as_the_array_version(seed):
    rng = np.random.default_rng(seed)
    verified_steps, accepted_steps, depth = [], [], DepthAcceptance()
    for _ in range(400):
        batch = int(rng.integers(0, 12))
        verified = rng.integers(0, 20, size=batch).tolist()
        accepted = [int(rng.integers(0, v + 2)) for v in verified]
        verified_steps.append(verified)
        accepted_steps.append(accepted)
        depth.observe(verified, accepted)
    tested, hits, profile = reference_depth(verified_steps, accepted_steps, 20)
    assert depth.tested == tested and depth.accepted == hits
    assert depth.depth_profile_floats(20) == profile == depth.depth_profile(20).tolist()


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_calibration_counts_the_same_on_floats_and_arrays(seed, monkeypatch):
    """Small steps are counted on floats, large ones with bincount: the same curve."""
    rng = np.random.default_rng(seed)
    small, large = ConfidenceCalibration(), ConfidenceCalibration()
    for _ in range(300):
        batch, width = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        probs = rng.uniform(-0.1, 1.1, size=(batch, width)).astype(np.float32)
        verified = rng.integers(0, width + 1, size=batch)
        accepted = [int(rng.integers(0, v + 1)) for v in verified]
        small.observe(probs, verified, accepted)
        monkeypatch.setattr(calibration, "_SMALL", -1)
        large.observe(probs, verified, accepted)
        monkeypatch.undo()
        assert small.tested == large.tested and small.accepted == large.accepted
        assert small.table() == large.table()


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_confidence_update_on_floats_equals_the_array_update(seed):
    rng = np.random.default_rng(seed)
    cal = ConfidenceCalibration()
    for _ in range(300):
        batch, width = int(rng.integers(1, 9)), int(rng.integers(1, 8))
        probs = rng.uniform(0, 1, size=(batch, width)).astype(np.float32)
        drafted = [int(d) for d in rng.integers(0, width + 1, size=batch)]
        ema = rng.uniform(0, 1, size=batch).tolist()
        cal.observe(probs, drafted, [int(rng.integers(0, d + 1)) for d in drafted])
        for table in (cal.table(), None):
            calibrated = probs.astype(np.float64) if table is None else apply_table(table, probs)
            expected = update_confidence_ema(ema, calibrated, drafted, prior=0.6).tolist()
            assert update_confidence_floats(ema, probs.tolist(), drafted, table, prior=0.6) \
                == expected
        # A step without confidences: drafted rows read as 0, the others relax.
        assert update_confidence_floats(ema, None, drafted, cal.table(), prior=0.6) == \
            update_confidence_ema(ema, np.zeros((batch, 0)), drafted, prior=0.6).tolist()


# -- the whole policy ----------------------------------------------------------------------------
def _replay_decisions(monkeypatch, float_path: bool, batch: int, **policy_kw):
    monkeypatch.setattr(specserve, "FLOAT_PATH_MAX", 10 ** 9 if float_path else -1)
    monkeypatch.setattr(calibration, "_SMALL", 10 ** 9 if float_path else -1)
    monkeypatch.setattr(contracts, "FLOAT_CONFIDENCES_MAX", 10 ** 9 if float_path else -1)
    truth = CostModel((2e-3, 1e-5, 4e-4, 2e-8), (3e-4, 3e-4, 4e-5, 1e-9))
    cost = CostModel((0.02, 2e-5, 1e-5, 1e-8), (5e-4, 1.5e-3, 1e-5, 2e-9))
    policy = SpecServe(cost, max_k=6, **policy_kw)
    history: list = []
    estimates: list = []            # every step's updated confidence estimates
    observe_step = policy.observe_step
    policy.observe_step = lambda *args: estimates.append(observe_step(*args)) or estimates[-1]
    traces = make_traces(batch, 2 * 150 + 64, seed=batch, easy_run=80, hard_run=10)
    result = replay(policy, truth, batch, 150, traces=traces, history=history)
    monkeypatch.undo()
    return history, estimates, result, policy.learned.to_dict(), cost.scale, cost.step_overhead


@pytest.mark.parametrize("batch,kw", [(1, {}), (3, {}), (8, {}), (4, {"in_loop": True}),
                                      (2, {"calibrate": False}), (5, {"correct_goodput": False})])
def test_policy_decides_the_same_on_floats_and_arrays(monkeypatch, batch, kw):
    floats = _replay_decisions(monkeypatch, True, batch, **kw)
    arrays = _replay_decisions(monkeypatch, False, batch, **kw)
    assert floats[0] == arrays[0]           # every step's caps
    assert floats[1] == arrays[1]           # every step's confidence estimates
    assert floats[2:] == arrays[2:]         # tokens/s, and everything it learned
    assert len({max(ks) for ks in floats[0]}) > 1, "the replay never changed its mind"


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_decisions_under_tpot_budgets_are_the_same_on_floats_and_arrays(monkeypatch, seed):
    """decide() on random batches with budgets and slack, after some learning (goodput
    corrections that differ per k): the same Decision either way."""
    rng = np.random.default_rng(seed)
    cost = random_cost(rng)
    policies = [SpecServe(cost, max_k=int(rng.integers(1, 9)), probe_every=10 ** 9)]
    for batch in range(1, 17):
        for k in range(0, 9):
            policies[0].learned.goodput.observe(batch, k, 1.0, float(rng.lognormal(0, 0.5)))
    for _ in range(200):
        state = random_state(rng, int(rng.integers(1, 17)), policies[0].max_k, slo=True)
        decisions = []
        for limit in (10 ** 9, -1):
            monkeypatch.setattr(specserve, "FLOAT_PATH_MAX", limit)
            decisions.append(policies[0].decide(state))
        monkeypatch.undo()
        (a, b) = decisions
        assert (a.max_k, a.probe, a.confidence, a.context, a.control is None) == \
            (b.max_k, b.probe, b.confidence, b.context, b.control is None)
