"""Trace replay of a speculation policy through a surrogate cost law (no models, no Ray).

The policy plans with its own (possibly wrong) CostModel; simulated time is charged from
a "true" one. Draft confidences and acceptances come from fixed per-position traces, so
every policy replays the very same random stream. Each step runs the policy's real step
protocol: `decide`, the in-loop DraftControl exactly as the draft worker applies it
(calibrated confidences into the stop rule, raw ones in the Proposal), and
`observe_step` on a StepPlan / StepResult built like the workers' (contracts.py).

Also the surrogate laws themselves and a CostModel fitted to noisy profiles of them
(`true_cost`, `fitted_cost`), shared by the policy tests.
"""
from __future__ import annotations

import numpy as np
import torch

from specserve_ray.contracts import Proposal, StepPlan, StepResult, VerifyResult
from specserve_ray.policy import (BatchState, CostModel, Sample, padded_tokens, profile_grid,
                                  record_step, start_drafting)


def make_traces(batch: int, length: int, seed: int, easy=(18, 2), hard=(2, 8),
                easy_run: float = 40, hard_run: float = 25):
    """Per-slot confidences alternating easy and hard stretches (beta draws); a token is
    accepted iff u < conf. Returns (conf [B, T], accept [B, T], prompt lengths [B])."""
    rng = np.random.default_rng(seed)
    conf = np.empty((batch, length))
    for slot in range(batch):
        t, is_easy = 0, bool(rng.random() < 0.5)
        while t < length:
            n = min(int(rng.geometric(1 / (easy_run if is_easy else hard_run))), length - t)
            conf[slot, t:t + n] = rng.beta(*(easy if is_easy else hard), size=n)
            t, is_easy = t + n, not is_easy
    accept = rng.random((batch, length)) < conf
    return conf, accept, rng.integers(128, 1024, size=batch)


def runs_of(accept: np.ndarray) -> np.ndarray:
    """run[b, t] = accepts in a row from t (wrapping)."""
    wrapped = np.concatenate([accept, accept[:, :32]], axis=1)
    run = np.zeros(wrapped.shape, np.int64)
    for t in range(wrapped.shape[1] - 2, -1, -1):
        run[:, t] = np.where(wrapped[:, t], run[:, t + 1] + 1, 0)
    return run[:, :accept.shape[1]]


def replay(policy, truth: CostModel, batch: int, tokens_per_slot: int, seed: int = 0,
           traces=None, overhead: float = 0.0, reported_conf=None, history=None):
    """Fixed-size continuous batching until every slot emitted `tokens_per_slot`.

    `reported_conf` [B, T], if given, is what the draft *reports* (acceptance still
    follows the traces): a miscalibrated draft. `history`, a list, gets each step's
    chosen caps. Returns (tokens per simulated second, mean verified drafts per row-step).
    """
    length = 2 * tokens_per_slot + 64
    conf, accept, prompt = traces if traces is not None else make_traces(batch, length, seed)
    length = conf.shape[1]
    run = runs_of(accept)
    shown = conf if reported_conf is None else reported_conf
    slots = np.arange(batch)
    position = np.zeros(batch, np.int64)
    ema: list = [None] * batch
    seconds, emitted, verified_total, steps = 0.0, 0, 0, 0
    while position.min() < tokens_per_slot:
        context = (prompt + position).tolist()
        state = BatchState(context, (policy.max_k,) * batch, ema)
        decision = policy.decide(state)
        caps = np.asarray(decision.max_k, np.int64)
        if history is not None:
            history.append(decision.max_k)
        control = decision.control
        width = int(caps.max(initial=0))
        raw = np.zeros((batch, width))
        if control is None:         # the worker's fast path: every row to its cap, all verified
            drafted = caps.copy()
            columns = np.arange(width)
            raw = np.where(columns < drafted[:, None],
                           shown[slots[:, None], (position[:, None] + columns) % length], 0.0)
            verified = drafted
            active_counts = tuple(int((drafted > j).sum()) for j in range(width))
        else:                       # step by step, as workers/draft.py runs it
            progress = start_drafting(caps)
            while (rows := control.should_continue(progress)).any():
                step = shown[slots, (position + progress.num_drafted) % length]
                raw[rows, progress.num_drafted[rows]] = step[rows]
                progress = record_step(progress, control.calibrated(step), rows)
            drafted, active_counts = progress.num_drafted, progress.active_counts
            verified = control.select_verify(raw, drafted, active_counts)
        accepted = np.minimum(verified, run[slots, position % length])
        draft_s = truth.predict_draft_ragged(active_counts, max(context))
        verify_s = float(truth.predict_verify(batch, padded_tokens(verified.tolist()), max(context)))
        step_s = draft_s + verify_s + overhead
        seconds += step_s
        plan = StepPlan(decode_ids=[f"r{i}" for i in range(batch)], num_draft=caps.tolist())
        proposal = None
        if drafted.any():
            proposal = Proposal(torch.zeros(batch, int(verified.max(initial=0)), dtype=torch.long),
                                torch.from_numpy(verified.astype(np.int64)), None,
                                torch.from_numpy(raw[:, :int(drafted.max())]).float(), draft_s,
                                torch.from_numpy(drafted.astype(np.int64)))
        result = StepResult([], VerifyResult([[0] * (int(a) + 1) for a in accepted],
                                             accepted.tolist(), verify_s), proposal)
        ema = policy.observe_step(plan, result, step_s, decision, ema)
        position += accepted + 1
        emitted += int(accepted.sum()) + batch
        verified_total += int(verified.sum())
        steps += 1
    return emitted / seconds, verified_total / (steps * batch)


# Surrogate laws (seconds). Verify: v0 + v1 B + v2 tokens + v3 B L (tokens padded: B W).
# Draft: d0 [k > 0] + k (d1 + d2 B + d3 B L).
# Memory-bound: the verify forward barely notices extra tokens (weights dominate).
# Compute-bound: every verified token costs 0.4 ms, so speculation stops paying at load.
MEMORY_BOUND = ((0.020, 2e-5, 1e-5, 1e-8), (5e-4, 1.5e-3, 1e-5, 2e-9))
COMPUTE_BOUND = ((2e-3, 1e-5, 4e-4, 2e-8), (3e-4, 3e-4, 4e-5, 1e-9))
REGIMES = {"memory-bound": MEMORY_BOUND, "compute-bound": COMPUTE_BOUND}


def true_cost(regime: str) -> CostModel:
    verify, draft = REGIMES[regime]
    return CostModel(verify, draft)


def profiled_samples(truth: CostModel, rng: np.random.Generator, noise: float = 0.03,
                     contexts=(256, 1024, 4096)) -> list[Sample]:
    samples = []
    for kind in ("verify", "draft"):
        for batch, tokens, context in profile_grid(64, 9, contexts, kind):
            law = truth.predict_verify if kind == "verify" else truth.predict_draft
            seconds = float(law(batch, tokens, context)) * rng.lognormal(0.0, noise)
            samples.append(Sample(kind, batch, tokens, context, seconds))
    return samples


def fitted_cost(regime: str, seed: int = 0) -> CostModel:
    return CostModel().fit(profiled_samples(true_cost(regime), np.random.default_rng(seed)))


def state_for(batch: int, confidence: float, context: int = 512, cap: int = 8, **kw) -> BatchState:
    return BatchState((context,) * batch, (cap,) * batch, (confidence,) * batch, **kw)
