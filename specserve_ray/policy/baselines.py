"""The baselines SpecServe is measured against: every one a SpeculationPolicy.

    NoSpeculation        plain decoding
    StaticK(k)           vLLM-style fixed k
    ConfidenceThreshold  Hugging Face `assistant_confidence_threshold`: draft while the
                         last draft token's probability >= threshold, up to max_k
    SmartSpec            arXiv 2406.14066: global acceptance EMA, one k for the batch
                         maximizing goodput, re-decided every 20 steps
"""
from __future__ import annotations

import numpy as np

from specserve_ray.policy.contracts import BatchState, SpeculationPolicy, StepFeedback
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy.cost_model import CostModel
from specserve_ray.policy.efficiency import expected_tokens_uniform

__all__ = ["NoSpeculation", "StaticK", "ConfidenceThreshold", "SmartSpec"]


class NoSpeculation(SpeculationPolicy):
    name = "none"

    def __init__(self, learned=None):
        super().__init__(max_k=0, learned=learned)

    def _decide(self, state, confidence):
        return np.zeros_like(state.caps), None, False


class StaticK(SpeculationPolicy):
    name = "static"

    def __init__(self, k: int, learned=None):
        super().__init__(max_k=k, learned=learned)

    def _decide(self, state, confidence):
        return np.minimum(state.caps, self.max_k), None, False


class ConfidenceThreshold(SpeculationPolicy):
    name = "threshold"

    def __init__(self, threshold: float = 0.4, max_k: int = 8, learned=None):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in (0, 1], got {threshold}")
        super().__init__(max_k, learned)
        self.threshold = threshold

    def _decide(self, state, confidence):
        return (np.minimum(state.caps, self.max_k),
                DraftControl(stop="threshold", threshold=self.threshold), False)


class SmartSpec(SpeculationPolicy):
    """One k for the whole batch from a global acceptance-rate EMA (arXiv 2406.14066)."""

    name = "smartspec"

    def __init__(self, cost: CostModel, max_k: int = 8, *, initial_acceptance: float = 0.7,
                 observation_weight: float = 0.15, plain_bonus: float = 1.1,
                 interval: int = 20, idle_relax: float = 0.05, learned=None):
        super().__init__(max_k, learned)
        self.cost = cost
        self.initial_acceptance = initial_acceptance
        self.acceptance = initial_acceptance      # a <- (1 - w) a + w a_obs, w = 0.15
        self.observation_weight = observation_weight
        # Ours, not the paper's: once k = 0 nothing is verified and a would freeze at the
        # low value that chose k = 0, so plain decoding would last forever. Steps without
        # verification relax a upward toward its initial value, which makes it probe again.
        self.idle_relax = idle_relax
        self.plain_bonus = plain_bonus            # goodput(0) weight: prefer plain on a tie
        self.interval = interval                  # steps between re-decisions
        self.k: int | None = None
        self._steps = 0
        self._last: BatchState | None = None

    def best_k(self, state: BatchState) -> int:
        """argmax_k B (1 - a^(k+1)) / (1 - a) / T(k), goodput(0) weighted by plain_bonus."""
        batch, ks = state.batch_size, np.arange(self.max_k + 1)
        seconds = self.cost.predict_step(batch, ks, state.max_context, state.uses_draft_model)
        goodput = batch * expected_tokens_uniform(self.acceptance, ks) / seconds
        goodput[0] *= self.plain_bonus
        return int(np.argmax(goodput))

    def _decide(self, state, confidence):
        self._last = state
        if self.k is None:
            self.k = self.best_k(state)
        return np.minimum(state.caps, self.k), None, False

    def observe(self, feedback: StepFeedback, decision=None) -> bool:
        """EMA update every step; True when the periodic re-decision changed k."""
        verified, accepted = sum(feedback.verified), sum(feedback.num_accepted)
        if verified > 0:
            w = self.observation_weight
            self.acceptance = (1 - w) * self.acceptance + w * accepted / verified
        elif self.acceptance < self.initial_acceptance:
            self.acceptance += self.idle_relax * (self.initial_acceptance - self.acceptance)
        self._steps += 1
        if self._steps % self.interval or self._last is None:
            return False
        previous, self.k = self.k, self.best_k(self._last)
        return self.k != previous
