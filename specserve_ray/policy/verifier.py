"""Confidence-prior verifier (SpecServe, arXiv 2503.05096, section 5.2): how many of
the drafted tokens each request sends to the target.

Once drafting is done its time is spent; verification still costs per token of the
padded forward: every row is padded to the longest verified row, so only the longest
row's length moves the verify time. For a fixed longest length w the best plan keeps
min(num_draft_i, w) tokens of every row (more tokens, same time), so the verifier scans
w and keeps the one with the highest E = N / T(w). A verification token budget, if
given, drops the lowest-survival tokens first (`trim_to_budget`; c never grows along a
row, so that stays prefix-closed). `brute_force_verify` enumerates every prefix-length
vector as the reference.

Shapes: draft_confidences [B, K] per-token draft probabilities (columns beyond a row's
num_draft are ignored), num_draft [B]; the result num_verify [B] has num_verify <=
num_draft elementwise.
"""
from __future__ import annotations

import itertools

import numpy as np

from specserve_ray.policy.cost_model import CostModel, padded_tokens
from specserve_ray.policy.efficiency import as_array, cumulative_confidence, draft_mask

__all__ = ["select_verify", "trim_to_budget", "brute_force_verify", "plan_efficiency"]


def _drop_order(draft_confidences, num_draft):
    """Drafted tokens in the order the greedy drops them: lowest c first, later position
    first among ties, so each drop is the current last token of its row."""
    counts = as_array(num_draft, np.int64)
    survival = cumulative_confidence(draft_confidences)
    if survival.shape[0] != counts.shape[0] or counts.max(initial=0) > survival.shape[1]:
        raise ValueError("draft_confidences [B, K] and num_draft [B] do not match")
    mask = draft_mask(counts, survival.shape[1])
    row, position = np.nonzero(mask)
    value = survival[row, position]
    order = np.lexsort((-position, value))
    return counts, row[order], value[order], float(value.sum())


def _kept_after(counts: np.ndarray, dropped_rows: np.ndarray) -> np.ndarray:
    return counts - np.bincount(dropped_rows, minlength=counts.shape[0])


def _forced_drops(total: int, verify_budget: int | None) -> int:
    # The budget counts draft tokens the target verifies in the batch; each request's
    # one final token is always scored and does not count against it.
    if verify_budget is None:
        return 0
    return max(0, total - max(verify_budget, 0))


def trim_to_budget(draft_confidences, num_draft, verify_budget: int | None) -> np.ndarray:
    """Drop lowest-c tokens until at most `verify_budget` draft tokens remain (no
    efficiency check): how budget-unaware policies honour a controller's budget."""
    if verify_budget is None:
        return as_array(num_draft, np.int64).copy()
    counts, rows, _, _ = _drop_order(draft_confidences, num_draft)
    return _kept_after(counts, rows[:_forced_drops(rows.size, verify_budget)])


def select_verify(draft_confidences, num_draft, cost: CostModel, context: float, *,
                  verify_budget: int | None = None, fixed_seconds: float = 0.0) -> np.ndarray:
    """Confidence-prior trim under padded verification; returns num_verify [B] (int64).

    The target pads every row to the longest (cost_model.padded_tokens), so for a given
    longest row w every row may as well verify min(num_draft, w): dropping a shorter
    row's tail lowers N and saves nothing. The plan is then the best w by E = N / T(w),
    after a verification budget, if any, dropped the lowest-survival tokens first.
    `fixed_seconds` is step time that does not depend on the verified length (the draft
    time already spent, router overhead); it belongs in E's denominator because the step
    costs it either way, and it makes the verifier keep more tokens.
    """
    counts = trim_to_budget(draft_confidences, num_draft, verify_budget)
    longest = int(counts.max(initial=0))
    if longest == 0:
        return counts
    survival = cumulative_confidence(draft_confidences)
    batch = counts.shape[0]
    widths = np.arange(longest + 1)                                     # w = kept per row
    kept = np.minimum(counts[None, :], widths[:, None])                 # [W, B]
    gained = np.concatenate([np.zeros((batch, 1)), np.cumsum(
        np.where(draft_mask(counts, survival.shape[1]), survival, 0.0), axis=1)], axis=1)
    expected = batch + gained[np.arange(batch)[None, :], kept].sum(axis=1)   # [W]
    seconds = fixed_seconds + cost.predict_verify(batch, batch * (widths + 1), context)
    best = int(np.argmax(expected / seconds))      # the shortest of equals: argmax is first
    return kept[best].astype(np.int64)


def plan_efficiency(draft_confidences, num_verify, cost: CostModel, context: float,
                    fixed_seconds: float = 0.0) -> float:
    """E of verifying the first num_verify[i] drafted tokens of each request (padded)."""
    counts = as_array(num_verify, np.int64)
    survival = cumulative_confidence(draft_confidences)
    batch = counts.shape[0]
    expected = batch + survival[draft_mask(counts, survival.shape[1])].sum()
    tokens = padded_tokens(counts.tolist())
    return float(expected / (fixed_seconds + cost.predict_verify(batch, tokens, context)))


def brute_force_verify(draft_confidences, num_draft, cost: CostModel, context: float, *,
                       verify_budget: int | None = None, fixed_seconds: float = 0.0
                       ) -> tuple[np.ndarray, float]:
    """Reference: the best prefix-length vector by enumeration (small B and K only)."""
    counts = as_array(num_draft, np.int64)
    if np.prod(counts + 1, dtype=np.float64) > 2e5:
        raise ValueError("brute force is for small cases only")
    best, best_e = None, -np.inf
    for lengths in itertools.product(*(range(int(k) + 1) for k in counts)):
        if verify_budget is not None and sum(lengths) > max(verify_budget, 0):
            continue
        e = plan_efficiency(draft_confidences, lengths, cost, context, fixed_seconds)
        if e > best_e:
            best, best_e = np.array(lengths, np.int64), e
    return best, best_e
