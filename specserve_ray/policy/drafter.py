"""Adaptive drafter (SpecServe, arXiv 2503.05096, section 5.1): when to stop drafting.

Drafting runs one step at a time. Before each step the drafter predicts how the step's
efficiency E = N / T would move if some requests drafted further, extrapolating each
request's prefix survival with its running mean confidence, c_i(j+1) = c_ij * m_i, and
stops rows where drafting no longer pays. After the step the real confidences replace
the prediction, so a request whose draft suddenly gets unsure stops at once.

Two refinements over a literal "compare E(j+1) with E(j)":

* Lookahead. The draft call has a one-time overhead (transport, launch), so one more
  step can look unprofitable while three more pay. `should_continue` therefore compares
  E now with the best predicted E over every depth still allowed. Past the first step
  the predicted curve is unimodal (concave N over affine T), so this equals the
  one-step rule there; it only changes the answer where the overhead makes a dip.
* Per-request choice. For each depth h the candidates are the top-m rows by predicted
  gain; the best (m, h) decides which rows draft the next step. Rows that stop never
  resume within a step: drafted tokens must stay contiguous.

The loop owner (a draft worker, the engine, a simulator) keeps a `DraftProgress`:

    progress = start_drafting(max_k)                       # [B] caps from the Decision
    while (rows := control.should_continue(progress)).any():     # control.DraftControl
        step_confidence = draft_one_step(rows)             # [B] prob of each new token
        progress = record_step(progress, step_confidence, rows)
    progress.confidences, progress.num_drafted             # -> the verifier
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specserve_ray.policy.cost_model import CostModel
from specserve_ray.policy.efficiency import as_array

__all__ = ["DraftProgress", "start_drafting", "record_step", "should_continue"]


@dataclass(frozen=True)
class DraftProgress:
    """What one step's drafting has produced so far, per request (B rows)."""

    max_k: np.ndarray                  # [B] int64, cap on this step's draft tokens
    num_drafted: np.ndarray            # [B] int64, tokens drafted so far
    confidences: np.ndarray            # [B, max(max_k)] draft prob per drafted token, 0 beyond
    cumulative_confidence: np.ndarray  # [B] c of each row's last drafted token (1 before any)
    last_confidence: np.ndarray        # [B] p of each row's last drafted token (1 before any)
    active: np.ndarray                 # [B] bool, may still draft this step
    expected_accepted: float           # sum of c over every token drafted so far
    active_counts: tuple[int, ...]     # rows that drafted at each step, for the draft time

    @property
    def step(self) -> int:
        """Draft steps run so far (j)."""
        return len(self.active_counts)

    @property
    def batch_size(self) -> int:
        return int(self.max_k.shape[0])


def start_drafting(max_k) -> DraftProgress:
    caps = np.maximum(as_array(max_k, np.int64).reshape(-1), 0)
    batch = caps.shape[0]
    return DraftProgress(max_k=caps, num_drafted=np.zeros(batch, np.int64),
                         confidences=np.zeros((batch, int(caps.max(initial=0)))),
                         cumulative_confidence=np.ones(batch), last_confidence=np.ones(batch),
                         active=caps > 0, expected_accepted=0.0, active_counts=())


def record_step(progress: DraftProgress, step_confidence, drafted) -> DraftProgress:
    """Progress after one draft step: rows in `drafted` [B] bool got a token whose draft
    probability is `step_confidence` [B] (ignored elsewhere); other rows stop for good."""
    rows = as_array(drafted, bool) & progress.active
    probs = as_array(step_confidence)
    probs = np.where(probs > 0.0, np.minimum(probs, 1.0), 0.0)     # NaN -> 0 too
    num_drafted = progress.num_drafted + rows
    survival = np.where(rows, progress.cumulative_confidence * probs, progress.cumulative_confidence)
    confidences = progress.confidences.copy()
    index = np.flatnonzero(rows)
    confidences[index, progress.num_drafted[index]] = probs[index]
    return DraftProgress(
        max_k=progress.max_k, num_drafted=num_drafted, confidences=confidences,
        cumulative_confidence=survival,
        last_confidence=np.where(rows, probs, progress.last_confidence),
        active=rows & (num_drafted < progress.max_k),
        expected_accepted=progress.expected_accepted + float(survival[index].sum()),
        active_counts=progress.active_counts + (int(index.size),))


def should_continue(progress: DraftProgress, mean_confidence, cost: CostModel,
                    context: float) -> np.ndarray:  # [B] bool
    """Rows that should draft step j+1: those in the best predicted continuation, if it
    beats E(j); all False to stop. `mean_confidence` is a scalar or [B]; `context` is the
    batch's longest context (what the forwards attend over)."""
    batch = progress.batch_size
    remaining = progress.max_k - progress.num_drafted
    rows = np.flatnonzero(progress.active & (remaining > 0))
    keep = np.zeros(batch, bool)
    if rows.size == 0:
        return keep
    mean = np.clip(as_array(mean_confidence), 0.0, 1.0)
    mean = mean[rows] if mean.ndim else np.full(rows.size, float(mean))
    survival = progress.cumulative_confidence[rows]
    remaining = remaining[rows]
    horizon = int(remaining.max())
    depths = np.arange(1, horizon + 1)
    columns = np.arange(horizon)

    # gain[i, h-1]: expected tokens row i adds by drafting h more steps (capped by its k).
    depth = np.minimum(depths[None, :], remaining[:, None])                    # [n, H]
    geometric = np.cumsum(mean[:, None] ** depths[None, :], axis=1)            # [n, H]
    gain = survival[:, None] * geometric[np.arange(rows.size)[:, None], depth - 1]
    order = np.argsort(-gain, axis=0, kind="stable")                           # per depth h
    gain_top = np.cumsum(gain[order, columns], axis=0)                         # [m, H]
    depth_sorted = depth[order, columns]

    # Rows drafting at future step l among the top m, for lookahead h: [l, m, h].
    counts = np.cumsum(depth_sorted[None, :, :] >= depths[:, None, None], axis=1)
    draft_more = cost.predict_draft_step(counts, context).sum(axis=0)          # [m, H]
    if progress.step == 0:
        draft_more = draft_more + cost.draft_overhead

    # Time the step costs whatever happens next: drafting already done, and the fixed
    # per-step overhead (router, transport), which favours deeper drafts where it is large.
    sunk_draft = cost.predict_draft_ragged(progress.active_counts, context) + cost.step_overhead
    # The verify forward pads every row to the longest (cost_model.padded_tokens): a
    # continuation costs verify time only where it makes the longest row longer.
    longest_now = int(progress.num_drafted.max(initial=0))
    reach = np.maximum.accumulate(progress.num_drafted[rows][order] + depth_sorted, axis=0)
    width_next = np.maximum(reach, longest_now) + 1                            # [m, H]
    expected_now = batch + progress.expected_accepted
    e_now = expected_now / (sunk_draft + float(cost.predict_verify(batch, batch * (longest_now + 1),
                                                                   context)))
    e_next = (expected_now + gain_top) / (
        sunk_draft + draft_more + cost.predict_verify(batch, batch * width_next, context))
    top_m, depth_h = np.unravel_index(int(np.argmax(e_next)), e_next.shape)
    if not e_next[top_m, depth_h] > e_now:
        return keep
    keep[rows[order[: top_m + 1, depth_h]]] = True
    return keep
