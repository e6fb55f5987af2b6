"""Confidence-prior verifier (SpecServe, arXiv 2503.05096, section 5.2): how many of
the drafted tokens each request sends to the target.

Once drafting is done its time is spent; verification still costs per token. The
verifier repeatedly drops the remaining draft token with the lowest prefix survival c
across the whole batch (always some row's last token, because c never grows along a
row) and keeps the trimmed plan while E = N / T does not fall. A verification token
budget, if given, forces drops first.

Why greedy is exact (TETRIS, arXiv 2502.15197): for a fixed number n of kept draft
tokens, N is largest when the kept set is the top-n by c, and that set is prefix-closed
because c is monotone along each row. N(n) is then concave in n (sorted increments) and
T(n) is affine in n (the cost model is linear in the token count), so E(n) = N(n) / T(n)
is unimodal: dropping until the first fall reaches the global maximum over all
prefix-length vectors. `brute_force_verify` enumerates those vectors as the reference.

Shapes: draft_confidences [B, K] per-token draft probabilities (columns beyond a row's
num_draft are ignored), num_draft [B]; the result num_verify [B] has num_verify <=
num_draft elementwise.
"""
from __future__ import annotations

import itertools

import numpy as np

from specserve_ray.policy.cost_model import CostModel
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
    """Greedy confidence-prior trim; returns num_verify [B] (int64).

    `fixed_seconds` is step time that does not depend on the verified length (the
    draft time already spent, router overhead); it belongs in E's denominator because
    the step costs it either way, and it makes the verifier keep more tokens.
    """
    counts, rows, values, total_value = _drop_order(draft_confidences, num_draft)
    batch, total = counts.shape[0], rows.size
    dropped = np.arange(total + 1)
    expected = batch + total_value - np.concatenate([[0.0], np.cumsum(values)])   # N after m drops
    seconds = fixed_seconds + cost.predict_verify(batch, batch + total - dropped, context)
    efficiency = expected / seconds
    start = _forced_drops(total, verify_budget)
    # Drop while E does not fall: stop at the first m whose next drop lowers E.
    falls = np.flatnonzero(efficiency[start + 1:] < efficiency[start:-1])
    stop = start + int(falls[0]) if falls.size else total
    return _kept_after(counts, rows[:stop])


def plan_efficiency(draft_confidences, num_verify, cost: CostModel, context: float,
                    fixed_seconds: float = 0.0) -> float:
    """E of verifying the first num_verify[i] drafted tokens of each request."""
    counts = as_array(num_verify, np.int64)
    survival = cumulative_confidence(draft_confidences)
    batch = counts.shape[0]
    expected = batch + survival[draft_mask(counts, survival.shape[1])].sum()
    return float(expected / (fixed_seconds + cost.predict_verify(batch, batch + counts.sum(), context)))


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
