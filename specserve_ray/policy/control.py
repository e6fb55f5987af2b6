"""DraftControl: the part of a policy's decision that runs *inside* the draft loop.

A policy decides per-request caps before the step (`Decision.max_k`). Two of its
choices can only be made while drafting, from the confidences the draft model reports
token by token: when each row stops drafting (SpecServe 5.1, or Hugging Face's
confidence threshold) and how many of the drafted tokens go to the target (SpecServe
5.2's confidence-prior trim, or a controller's verification budget).

The draft worker usually lives in another process (a Ray actor), so those two rules
travel with the step plan as this small frozen object: a rule name, its numbers and,
for the efficiency rules, the cost model's coefficients. It is pure and picklable;
the same object drives the in-process engine, the Ray workers and the simulators, so
there is one implementation of each rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from specserve_ray.policy import drafter, verifier
from specserve_ray.policy.calibration import apply_table
from specserve_ray.policy.cost_model import CostModel
from specserve_ray.policy.drafter import DraftProgress

__all__ = ["DraftControl", "STOP_RULES", "TRIM_RULES"]

STOP_RULES = ("cap", "threshold", "efficiency")
TRIM_RULES = ("none", "budget", "efficiency")


@dataclass(frozen=True, eq=False)
class DraftControl:
    """How the draft loop stops and how its output is trimmed for verification.

    stop:  "cap"        every row drafts to its cap (fixed k)
           "threshold"  draft one token, then go on while the last token's probability
                        is >= `threshold` (Hugging Face's assistant_confidence_threshold)
           "efficiency" SpecServe's adaptive drafter: go on while the predicted E = N / T
                        of the step still rises (needs `cost`, `mean_confidence`, `context`)
    trim:  "none"       verify everything drafted
           "budget"     drop lowest-survival tokens down to `verify_budget`
           "efficiency" SpecServe's confidence-prior verifier within `verify_budget`
    """

    stop: str = "cap"
    trim: str = "none"
    threshold: float = 1.0
    verify_budget: int | None = None
    cost: CostModel | None = None
    mean_confidence: np.ndarray | float = 0.5   # [B] running mean confidence per row
    context: float = 0.0                         # longest context in the batch
    # Per-bin acceptance probability of a draft token by its confidence (calibration.py);
    # None = take the draft's probability at its word (the threshold rule always does).
    calibration: tuple[float, ...] | None = None
    # Rows draft at least this many tokens (within their caps) before the stop rule is
    # asked: the policy already decided, from measured goodput, that speculation pays.
    min_draft: int = 0

    def __post_init__(self):
        if self.stop not in STOP_RULES or self.trim not in TRIM_RULES:
            raise ValueError(f"unknown draft control {self.stop!r}/{self.trim!r}")
        if "efficiency" in (self.stop, self.trim) and self.cost is None:
            raise ValueError("the efficiency rules need a cost model")

    def calibrated(self, confidences) -> np.ndarray:
        """What the rules read as each token's acceptance probability."""
        if self.calibration is None:
            return np.asarray(confidences, np.float64)
        return apply_table(self.calibration, confidences)

    @property
    def is_trivial(self) -> bool:
        """True when the loop may draft every row to its cap and verify it all."""
        return self.stop == "cap" and (self.trim == "none" or
                                       (self.trim == "budget" and self.verify_budget is None))

    def should_continue(self, progress: DraftProgress) -> np.ndarray:  # [B] bool
        """Rows that draft the next step (rows that stop never resume within a step)."""
        if self.stop == "cap" or progress.step < self.min_draft:
            return progress.active.copy()
        if self.stop == "threshold":
            if progress.step == 0:      # always draft one token
                return progress.active.copy()
            return progress.active & (progress.last_confidence >= self.threshold)
        return drafter.should_continue(progress, self.mean_confidence, self.cost, self.context)

    def select_verify(self, draft_confidences, num_drafted,
                      active_counts: Sequence[int] | None = None) -> np.ndarray:  # [B] int64
        """How many of each row's drafted tokens the target verifies.

        `active_counts` is the number of rows that ran at each draft step (known exactly
        by the draft loop); without it rows are assumed to have drafted contiguously.
        """
        counts = np.asarray(num_drafted, np.int64)
        if self.trim == "none" or counts.max(initial=0) == 0:
            return counts.copy()
        draft_confidences = self.calibrated(draft_confidences)
        if self.trim == "budget":
            return verifier.trim_to_budget(draft_confidences, counts, self.verify_budget)
        if active_counts is None:
            active_counts = [int((counts >= j).sum())
                             for j in range(1, int(counts.max(initial=0)) + 1)]
        # Drafting time is spent either way, and the step's fixed overhead is paid either
        # way; both still sit in E's denominator.
        spent = self.cost.predict_draft_ragged(active_counts, self.context) \
            + self.cost.step_overhead
        return verifier.select_verify(draft_confidences, counts, self.cost, self.context,
                                      verify_budget=self.verify_budget, fixed_seconds=spent)
