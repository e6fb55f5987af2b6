"""Predicted goodput per uniform cap k, and which caps keep every TPOT budget: SpecServe's
step decision as pure math (specserve.py holds the policy around it).

    G(k) = sum_i N(m_i, min(k, cap_i)) / T(B, k, L_max)  x  correction(B, k)

Two implementations of the same arithmetic:

* numpy on [K+1, B] arrays (`expected_tokens_by_depth`, `predicted_goodput`,
  `slo_feasible_k`): any batch;
* plain floats (`cap_outlook`, `best_cap`): the per-step path of small batches. A step
  asks about 5-9 caps of 1-8 rows, where numpy's per-call cost (a microsecond or more
  a call, ~40 calls a decision) was most of the policy's CPU per step (README,
  "What is left at batch 1"). Every value is computed by the same expression in the same
  order as the numpy version (sums over rows fall back to numpy from 8 rows on, where
  numpy stops summing left to right), so both choose the same cap;
  tests/test_policy_cpu.py checks them against each other.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from specserve_ray.policy.contracts import BatchState
from specserve_ray.policy.cost_model import CostModel

__all__ = ["expected_tokens_by_depth", "predicted_goodput", "slo_feasible_k", "cap_outlook",
           "best_cap", "first_max"]


def expected_tokens_by_depth(confidence: np.ndarray, depth_profile: np.ndarray | None,
                             caps: np.ndarray, max_k: int) -> np.ndarray:  # [K+1, B]
    """Tokens each request emits per step for uniform caps 0..max_k (clipped to its own
    cap): 1 + a_1 + a_1 a_2 + ..., with a_j = m_i x depth_profile[j] (the measured
    acceptance at depth j relative to depth 0; None = the same at every depth)."""
    profile = np.ones(max_k) if depth_profile is None else np.asarray(depth_profile)[:max_k]
    per_depth = np.clip(confidence[None, :] * profile[:, None], 0.0, 1.0)       # [K, B]
    survival = np.cumprod(per_depth, axis=0)
    gained = np.concatenate([np.zeros((1, confidence.size)), np.cumsum(survival, axis=0)])
    ks = np.minimum(np.arange(max_k + 1)[:, None], caps[None, :])              # [K+1, B]
    return 1.0 + np.take_along_axis(gained, ks, axis=0)


def predicted_goodput(cost: CostModel, state: BatchState, confidence: np.ndarray,
                      max_k: int, depth_profile: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For caps k = 0..max_k: (tokens per request [K+1, B], step seconds [K+1],
    goodput [K+1]), uniform caps clipped to each request's own cap."""
    ks = np.arange(max_k + 1)
    per_row = np.minimum(ks[:, None], state.caps[None, :])                      # [K+1, B]
    tokens = expected_tokens_by_depth(confidence, depth_profile, state.caps, max_k)
    # predict_step's values, from its float twin (fewer numpy calls; the same floats)
    seconds = np.array(cost.step_seconds(state.batch_size, per_row.max(axis=1).tolist(),
                                         state.max_context, state.uses_draft_model))
    return tokens, seconds, tokens.sum(axis=1) / seconds


def slo_feasible_k(seconds: np.ndarray, tokens: np.ndarray, budget_s, slack_s=None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per k: whether every request keeps its TPOT budget, and the worst overrun.

    seconds [K+1] step time per k; tokens [K+1, B] tokens each request emits; budget_s
    [B] TPOT budgets (inf = none); slack_s [B] seconds each request is ahead (used up
    to four budgets, so one step never spends a long-banked lead at once).
    """
    budget = np.asarray(budget_s, np.float64)
    slack = np.zeros_like(budget) if slack_s is None else np.asarray(slack_s, np.float64)
    finite = np.isfinite(budget)
    if not finite.any():
        worst = np.zeros(len(seconds))
        return np.ones(len(seconds), bool), worst
    slack = np.clip(slack[finite], 0.0, 4 * budget[finite])
    overrun = (seconds[:, None] - slack[None, :]) / (tokens[:, finite] * budget[None, finite])
    worst = overrun.max(axis=1)
    return worst <= 1.0, worst


# -- the same on floats ------------------------------------------------------------------

def first_max(values: Sequence[float]) -> int:
    """np.argmax: the first of equal maxima (a NaN counts as the maximum)."""
    best = 0
    for i, v in enumerate(values):
        if v != v:
            return i
        if v > values[best]:
            best = i
    return best


def cap_outlook(cost: CostModel, batch: int, caps: Sequence[int], context: float,
                confidence: Sequence[float], depth_profile: Sequence[float] | None,
                max_k: int, drafts: bool = True
                ) -> tuple[list[list[float]], list[float], list[float]]:
    """`predicted_goodput` on floats: (tokens per request [B][K+1] (its transpose),
    seconds [K+1], goodput [K+1]); `drafts` as in CostModel.step_seconds."""
    profile = [1.0] * max_k if depth_profile is None else list(depth_profile)[:max_k]
    ks = range(max_k + 1)
    per_request = []
    for m, cap in zip(confidence, caps):
        gained, survival, total = [0.0], 1.0, 0.0
        for j, p in enumerate(profile):
            a = min(max(m * p, 0.0), 1.0)
            survival = a if j == 0 else survival * a
            total = survival if j == 0 else total + survival
            gained.append(total)
        per_request.append([1.0 + gained[k if k < cap else cap] for k in ks])
    widest = max(caps, default=0)
    seconds = cost.step_seconds(batch, [min(k, widest) for k in ks], context, drafts)
    if len(per_request) < 8:         # numpy sums fewer than 8 values left to right
        sums = [0.0] * (max_k + 1)
        for tokens in per_request:
            sums = [n + t for n, t in zip(sums, tokens)]
    else:                            # and more pairwise: let it, on the same [K+1, B] layout
        sums = np.array(list(zip(*per_request))).sum(axis=1).tolist()
    return per_request, seconds, [n / s for n, s in zip(sums, seconds)]


def best_cap(tokens: Sequence[Sequence[float]], seconds: Sequence[float],
             goodput: Sequence[float], budget_s: Sequence[float] | None,
             slack_s: Sequence[float] | None) -> int:
    """The cap of the highest goodput among those that keep every TPOT budget (the
    rule `slo_feasible_k` + argmax implement), or, when none does, the least worst
    overrun. tokens [B][K+1] per request, seconds and goodput [K+1]."""
    if budget_s is not None:
        slack_s = [0.0] * len(budget_s) if slack_s is None else slack_s
        rows = [(tokens[i], b, min(max(float(s), 0.0), 4 * b))
                for i, (b, s) in enumerate(zip(map(float, budget_s), slack_s))
                if math.isfinite(b)]
        if rows:
            worst = [max((sec - s) / (emitted[k] * b) for emitted, b, s in rows)
                     for k, sec in enumerate(seconds)]
            fits = [w <= 1.0 for w in worst]
            if not any(fits):
                return first_max([-w for w in worst])
            goodput = [g if f else -math.inf for g, f in zip(goodput, fits)]
    return first_max(goodput)
