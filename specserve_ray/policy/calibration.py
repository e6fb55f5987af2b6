"""Confidence calibration: from the draft's own token probability to the chance the
target accepts that token, learned online from what verification actually did.

SpecServe's efficiency estimate treats a draft token's probability p as its acceptance
probability. That holds for a well-calibrated draft under sampling; under greedy
verification a token is accepted when the draft's argmax equals the target's, which a
small, under-confident draft can do far more often than its p says (or less often, for
an over-confident one). Reading p through a measured curve fixes the estimate without
touching losslessness: the curve only steers how much is drafted and verified.

The curve: `bins` equal-width bins of p, each with the tokens the target actually
tested (a token is tested only if every earlier token of its row was accepted) and
those accepted, plus a prior of `prior_weight` pseudo-tokens at the bin's centre (so an
unseen bin means "trust p"). Bins are made non-decreasing by pool-adjacent-violators,
so higher confidence never maps to a lower acceptance. Pure numpy; no Ray.
"""
from __future__ import annotations

import numpy as np

from specserve_ray.policy.efficiency import as_array

__all__ = ["ConfidenceCalibration", "apply_table"]


# Steps with at most this many confidences are counted on plain floats: numpy's
# per-call cost on a few values exceeds the work (the counts are the same either way).
_SMALL = 40


def _isotonic(values: list[float], weights: list[float]) -> list[float]:
    """Non-decreasing weighted least-squares fit (pool adjacent violators)."""
    blocks: list[list[float]] = []       # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    fitted: list[float] = []
    for v, _, n in blocks:
        fitted += [v] * n
    return fitted


def apply_table(table, confidences) -> np.ndarray:
    """Map confidences (any shape, in [0, 1]) through a per-bin table."""
    table = np.asarray(table, np.float64)
    values = np.clip(np.nan_to_num(as_array(confidences), nan=0.0), 0.0, 1.0)
    index = np.minimum((values * table.size).astype(np.int64), table.size - 1)
    return table[index]


class ConfidenceCalibration:
    """The curve, learned per step: `tested` and `accepted` are per-bin decaying counts
    (lists of floats: at 10 bins numpy's per-call cost outweighed the arithmetic)."""

    def __init__(self, bins: int = 10, prior_weight: float = 2.0, decay: float = 0.999):
        if bins < 1 or prior_weight <= 0 or not 0 < decay <= 1:
            raise ValueError("calibration needs bins >= 1, prior_weight > 0, 0 < decay <= 1")
        self.bins = bins
        self.prior_weight = prior_weight
        self.decay = decay                 # old evidence fades: text and load change
        self.tested = [0.0] * bins
        self.accepted = [0.0] * bins
        self._table: tuple[float, ...] | None = None

    def observe(self, draft_confidences, num_verified, num_accepted) -> None:
        """One step: confidences [B, K] of the drafted tokens, how many of each row went
        to the target, and how many it accepted."""
        # A float32 array's tolist() gives the floats a float64 copy holds: no copy needed
        # on the small path (the large one clips and scales in float64, so it copies).
        probs = draft_confidences if isinstance(draft_confidences, np.ndarray) \
            else as_array(draft_confidences)
        if probs.ndim != 2 or probs.shape[1] == 0:
            return
        verified = [int(v) for v in num_verified]
        if max(verified, default=0) <= 0:
            return
        accepted = [int(a) for a in num_accepted]
        if probs.size <= _SMALL:
            tested, hit = self._count_small(probs.tolist(), verified, accepted)
        else:
            probs = as_array(probs)
            columns = np.arange(probs.shape[1])[None, :]
            verified, accepted = np.asarray(verified), np.asarray(accepted)
            # Tested: the accepted prefix plus the first rejected token, within what was sent.
            sent = columns < np.minimum(verified, accepted + 1)[:, None]
            index = np.minimum((np.clip(probs, 0, 1) * self.bins).astype(np.int64), self.bins - 1)
            tested = np.bincount(index[sent], minlength=self.bins).tolist()
            hit = np.bincount(index[sent & (columns < accepted[:, None])],
                              minlength=self.bins).tolist()
        decay = self.decay
        self.tested = [t * decay + n for t, n in zip(self.tested, tested)]
        self.accepted = [a * decay + n for a, n in zip(self.accepted, hit)]
        self._table = None

    def _count_small(self, probs: list[list[float]], verified: list[int],
                     accepted: list[int]) -> tuple[list[int], list[int]]:
        """Per bin, tokens tested and accepted, counted one token at a time."""
        bins = self.bins
        tested, hit = [0] * bins, [0] * bins
        for row, n_verified, n_accepted in zip(probs, verified, accepted):
            for j in range(min(n_verified, n_accepted + 1, len(row))):
                b = min(int(min(max(row[j], 0.0), 1.0) * bins), bins - 1)
                tested[b] += 1
                if j < n_accepted:
                    hit[b] += 1
        return tested, hit

    def table(self) -> tuple[float, ...]:
        """Acceptance probability per confidence bin (non-decreasing)."""
        if self._table is None:
            bins, prior = self.bins, self.prior_weight
            weight = [t + prior for t in self.tested]
            rate = [(a + prior * ((j + 0.5) / bins)) / w
                    for j, (a, w) in enumerate(zip(self.accepted, weight))]
            self._table = tuple(_isotonic(rate, weight))
        return self._table

    def __call__(self, confidences) -> np.ndarray:
        return apply_table(self.table(), confidences)
