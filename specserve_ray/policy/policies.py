"""Speculation policies: how many tokens each request drafts, and how many it verifies.

One interface, one step protocol, five implementations:

    decision = policy.decide(state)                  # BatchState -> Decision (caps per request)
    progress = start_drafting(decision.max_k)        # the draft worker runs decision.control:
    while (rows := policy.should_continue(progress)).any():
        progress = record_step(progress, draft_one_step(rows), rows)
    num_verify = policy.select_verify(progress.confidences, progress.num_drafted)
    ...verify, accept...
    changed = policy.observe(StepFeedback(...))      # True if the policy's parameters moved

    NoSpeculation        plain decoding
    StaticK(k)           vLLM-style fixed k
    ConfidenceThreshold  Hugging Face `assistant_confidence_threshold`: draft while the
                         last draft token's probability >= threshold, up to max_k
    SmartSpec            arXiv 2406.14066: global acceptance EMA, one k for the batch
                         maximizing goodput, re-decided every 20 steps
    SpecServe            arXiv 2503.05096 (the default): pre-check, adaptive drafter,
                         confidence-prior verifier, TPOT SLO constraint

A cluster controller narrows any policy at runtime with `apply_bounds`. Policies are
stateful but pure: numbers in, decisions out; no Ray, asyncio or I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from specserve_ray.policy import drafter, verifier
from specserve_ray.policy.calibration import ConfidenceCalibration
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy.cost_model import CostModel, Sample
from specserve_ray.contracts import RuntimeBounds  # noqa: F401 - re-exported for callers
from specserve_ray.policy.drafter import DraftProgress
from specserve_ray.policy.efficiency import as_array, draft_mask, expected_tokens_uniform

__all__ = ["BatchState", "Decision", "StepFeedback", "SpeculationPolicy", "NoSpeculation",
           "StaticK", "ConfidenceThreshold", "SmartSpec", "SpecServe", "max_k_within_tpot",
           "update_confidence_ema"]


@dataclass(frozen=True)
class BatchState:
    """What a policy sees before a step: one entry per running request, plus the load."""

    context_len: tuple[int, ...]         # tokens in each request's KV cache
    remaining_tokens: tuple[int, ...]    # tokens each request may still emit
    confidence_ema: tuple[float, ...]    # running mean draft confidence (update_confidence_ema)
    tpot_budget_s: tuple[float, ...] | None = None  # each request's TPOT SLO; None = no SLO
    queue_depth: int = 0                 # requests waiting for admission (cluster-wide)
    arrival_rate: float = 0.0            # requests per second (cluster-wide)

    def __post_init__(self):
        for name in ("context_len", "remaining_tokens", "confidence_ema", "tpot_budget_s"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        sizes = {len(self.context_len), len(self.remaining_tokens), len(self.confidence_ema)}
        if self.tpot_budget_s is not None:
            sizes.add(len(self.tpot_budget_s))
        if len(sizes) != 1:
            raise ValueError("BatchState per-request fields must have one entry per request")

    @property
    def batch_size(self) -> int:
        return len(self.context_len)

    # Cached: the draft loop asks for these after every draft step.
    @cached_property
    def mean_context(self) -> float:
        return sum(self.context_len) / len(self.context_len) if self.context_len else 0.0

    @cached_property
    def confidence(self) -> np.ndarray:  # [B] float64, confidence_ema as an array
        return np.asarray(self.confidence_ema, np.float64)

    @cached_property
    def tightest_tpot(self) -> float:
        return min(self.tpot_budget_s, default=math.inf) if self.tpot_budget_s else math.inf


@dataclass(frozen=True)
class Decision:
    """A policy's answer for one step."""

    max_k: tuple[int, ...]                # per request: draft at most this many tokens
    early_stop: bool = False              # consult policy.should_continue after each draft step
    verify_budget: int | None = None      # draft tokens the target may verify in total
    control: DraftControl | None = None   # the in-loop stop/trim rules; None = draft to max_k,
                                          # verify all (the draft worker's fast path)

    @property
    def speculates(self) -> bool:
        """False means a plain decoding step: no draft call at all."""
        return any(k > 0 for k in self.max_k)


@dataclass(frozen=True)
class StepFeedback:
    """What one step did, for `observe`."""

    num_drafted: tuple[int, ...]          # per request, draft tokens produced
    num_accepted: tuple[int, ...]         # per request, draft tokens the target accepted
    step_seconds: float                   # the whole step as the step loop saw it
    num_verified: tuple[int, ...] | None = None   # sent to the target; None = all drafted
    draft_seconds: float | None = None    # the draft call alone, if measured
    verify_seconds: float | None = None   # the target forward alone, if measured
    confidences: Any = None               # [B, K] per-token draft confidences, if kept
    # The step's batch and mean context; None = those of the last decide() (with
    # pipelining, another step may have been decided since this one).
    batch_size: int | None = None
    mean_context: float | None = None

    @property
    def verified(self) -> tuple[int, ...]:
        return self.num_drafted if self.num_verified is None else self.num_verified


def update_confidence_ema(ema, draft_confidences, num_drafted, *, weight: float = 0.3,
                          prior: float = 0.5, relax: float = 0.1) -> np.ndarray:  # [B]
    """Per-request running mean draft confidence, the m_i the adaptive drafter uses.

    Rows that drafted move toward the mean confidence of this step's tokens. Rows that
    did not draft relax *upward* toward `prior`: a request whose estimate fell so low
    that speculation stopped would otherwise never be measured again, even after its
    text turned easy. The relaxation makes it probe again after a few plain steps.
    """
    ema = as_array(ema).copy()
    counts = as_array(num_drafted, np.int64)
    if counts.size and counts.max() > 0:
        probs = as_array(draft_confidences)
        mask = draft_mask(counts, probs.shape[1])
        mean = np.where(mask, probs, 0.0).sum(axis=1) / np.maximum(counts, 1)
        ema = np.where(counts > 0, (1 - weight) * ema + weight * mean, ema)
    idle = counts == 0
    ema[idle] = np.maximum(ema[idle], ema[idle] + relax * (prior - ema[idle]))
    return ema


def max_k_within_tpot(cost: CostModel, batch: int, context: float, tpot_s: float,
                      max_k: int, acceptance: float = 0.0) -> int:
    """Largest uniform k <= max_k whose predicted time *per emitted token* fits `tpot_s`.

    TPOT is the time between a request's tokens, and a speculative step emits
    1 + a + ... + a^k of them per request on average (a = acceptance), so the step may
    take that many TPOT budgets. With a = 0 this is "the step fits the budget". The
    result caps every request's k; 0 (plain decoding) if no k fits.
    """
    if max_k <= 0 or not math.isfinite(tpot_s):
        return max(max_k, 0)
    ks = np.arange(max_k + 1)
    fits = cost.predict_step(batch, ks, context) <= tpot_s * expected_tokens_uniform(acceptance, ks)
    # The deepest k that fits (per-token time need not be monotone in k: cheap
    # verification makes deeper drafts *lower* it); none fits -> plain decoding.
    return int(np.flatnonzero(fits)[-1]) if fits.any() else 0


class SpeculationPolicy:
    """Base: caps, bounds and the default draft/verify behaviour (draft to the cap,
    verify everything within the budget). Subclasses implement `_choose_k`."""

    name = "policy"

    def __init__(self, max_k: int = 8):
        if max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {max_k}")
        self.max_k = max_k
        self.bounds = RuntimeBounds()
        self._state: BatchState | None = None
        self._control: DraftControl | None = None

    def apply_bounds(self, speculation_enabled: bool, max_k: int,
                     verify_budget: int | None) -> None:
        if max_k < 0 or (verify_budget is not None and verify_budget < 0):
            raise ValueError("bounds must be non-negative")
        self.bounds = RuntimeBounds(speculation_enabled, max_k, verify_budget)

    @property
    def k_limit(self) -> int:
        """The most any request may draft under this policy and the current bounds."""
        if not self.bounds.speculation_enabled:
            return 0
        return self.max_k if self.bounds.max_k is None else min(self.max_k, self.bounds.max_k)

    @property
    def verify_budget(self) -> int | None:
        return self.bounds.verify_budget

    def decide(self, state: BatchState) -> Decision:
        self._state = state
        # A step emits up to k + 1 tokens, so drafting past remaining - 1 is wasted work.
        caps = np.clip(np.asarray(state.remaining_tokens, np.int64) - 1, 0, self.k_limit)
        early_stop = False
        if caps.max(initial=0) > 0:
            chosen, early_stop = self._choose_k(state, caps)
            caps = np.minimum(np.asarray(chosen, np.int64), caps)
        if caps.max(initial=0) <= 0:
            self._control = None
            return Decision((0,) * state.batch_size, False, self.verify_budget)
        control = self._draft_control(state, early_stop)
        self._control = None if control.is_trivial else control
        return Decision(tuple(int(k) for k in caps), early_stop, self.verify_budget,
                        self._control)

    def _choose_k(self, state: BatchState, caps: np.ndarray) -> tuple[np.ndarray, bool]:
        """Per-request k (clipped to caps afterwards) and whether to stop early."""
        raise NotImplementedError

    def _draft_control(self, state: BatchState, early_stop: bool) -> DraftControl:
        """The rules the draft loop applies this step; by default draft to the cap and
        verify within the controller's budget."""
        return DraftControl(stop="cap", trim="budget", verify_budget=self.verify_budget)

    # The step-by-step hooks a draft loop calls; they apply the last decision's control.
    def should_continue(self, progress: DraftProgress) -> np.ndarray:  # [B] bool
        control = self._last_control()
        return progress.active.copy() if control is None else control.should_continue(progress)

    def select_verify(self, draft_confidences, num_draft) -> np.ndarray:  # [B] int64
        control = self._last_control()
        counts = as_array(num_draft, np.int64)
        return counts.copy() if control is None else control.select_verify(draft_confidences,
                                                                           counts)

    def _last_control(self) -> DraftControl | None:
        self._current_state()
        return self._control

    def observe(self, feedback: StepFeedback) -> bool:
        return False

    def calibrate(self, draft_confidences) -> np.ndarray:
        """Draft confidences as acceptance probabilities (identity unless calibrated)."""
        return as_array(draft_confidences)

    def _current_state(self) -> BatchState:
        if self._state is None:
            raise RuntimeError("call decide() before the draft and verify hooks")
        return self._state


class NoSpeculation(SpeculationPolicy):
    name = "none"

    def __init__(self):
        super().__init__(max_k=0)

    def _choose_k(self, state, caps):
        return np.zeros_like(caps), False


class StaticK(SpeculationPolicy):
    name = "static"

    def __init__(self, k: int):
        super().__init__(max_k=k)

    def _choose_k(self, state, caps):
        return caps, False


class ConfidenceThreshold(SpeculationPolicy):
    name = "threshold"

    def __init__(self, threshold: float = 0.4, max_k: int = 8):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in (0, 1], got {threshold}")
        super().__init__(max_k)
        self.threshold = threshold

    def _choose_k(self, state, caps):
        return caps, True

    def _draft_control(self, state, early_stop):
        return DraftControl(stop="threshold", threshold=self.threshold, trim="budget",
                            verify_budget=self.verify_budget)


class SmartSpec(SpeculationPolicy):
    """One k for the whole batch from a global acceptance-rate EMA (arXiv 2406.14066)."""

    name = "smartspec"

    def __init__(self, cost: CostModel, max_k: int = 8, *, initial_acceptance: float = 0.7,
                 observation_weight: float = 0.15, plain_bonus: float = 1.1,
                 interval: int = 20, idle_relax: float = 0.05):
        super().__init__(max_k)
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

    def best_k(self, state: BatchState) -> int:
        """argmax_k B (1 - a^(k+1)) / (1 - a) / T(k), goodput(0) weighted by plain_bonus."""
        batch, ks = state.batch_size, np.arange(self.k_limit + 1)
        seconds = self.cost.predict_step(batch, ks, state.mean_context)
        goodput = batch * expected_tokens_uniform(self.acceptance, ks) / seconds
        goodput[0] *= self.plain_bonus
        return int(np.argmax(goodput))

    def _choose_k(self, state, caps):
        if self.k is None:
            self.k = self.best_k(state)
        return np.full_like(caps, self.k), False

    def observe(self, feedback):
        """EMA update every step; True when the periodic re-decision changed k."""
        verified, accepted = sum(feedback.verified), sum(feedback.num_accepted)
        if verified > 0:
            w = self.observation_weight
            self.acceptance = (1 - w) * self.acceptance + w * accepted / verified
        elif self.acceptance < self.initial_acceptance:
            self.acceptance += self.idle_relax * (self.initial_acceptance - self.acceptance)
        self._steps += 1
        if self._steps % self.interval or self._state is None:
            return False
        previous, self.k = self.k, self.best_k(self._state)
        return self.k != previous


class SpecServe(SpeculationPolicy):
    """Load-adaptive speculation from a cost model and live confidences (the default)."""

    name = "specserve"

    def __init__(self, cost: CostModel, max_k: int = 8, *, enforce_slo: bool = True,
                 calibrate: bool = True):
        super().__init__(max_k)
        self.cost = cost
        self.enforce_slo = enforce_slo   # the released SpecServe code left this off; we don't
        # Ours: read draft confidences through the acceptance curve measured while serving
        # (calibration.py) instead of taking them as acceptance probabilities.
        self.calibration = ConfidenceCalibration() if calibrate else None

    def _choose_k(self, state, caps):
        batch, context = state.batch_size, state.mean_context
        if self.enforce_slo:
            # The batch's mean (calibrated) confidence stands in for each request's
            # acceptance: the cap is one k for the whole step.
            caps = np.minimum(caps, max_k_within_tpot(
                self.cost, batch, context, state.tightest_tpot, int(caps.max()),
                float(state.confidence.mean())))
        if not drafter.precheck(batch, state.confidence, context, self.cost, caps):
            return np.zeros_like(caps), False
        return caps, True

    def _draft_control(self, state, early_stop):
        return DraftControl(stop="efficiency" if early_stop else "cap", trim="efficiency",
                            verify_budget=self.verify_budget, cost=self.cost,
                            mean_confidence=state.confidence, context=state.mean_context,
                            calibration=None if self.calibration is None
                            else self.calibration.table())

    def calibrate(self, draft_confidences):
        if self.calibration is None:
            return as_array(draft_confidences)
        return self.calibration(draft_confidences)

    def observe(self, feedback):
        """Correct the cost model from measured draft/verify times; True if it moved."""
        if self.calibration is not None and feedback.confidences is not None:
            self.calibration.observe(feedback.confidences, feedback.verified,
                                     feedback.num_accepted)
        state = self._current_state()
        batch = state.batch_size if feedback.batch_size is None else feedback.batch_size
        context = state.mean_context if feedback.mean_context is None else feedback.mean_context
        changed = False
        if feedback.verify_seconds is not None:
            changed |= self.cost.observe(Sample("verify", batch, batch + sum(feedback.verified),
                                                context, feedback.verify_seconds))
        steps = max(feedback.num_drafted, default=0)
        if feedback.draft_seconds is not None and steps > 0:
            # Per-step draft cost is affine in the rows, so a ragged call costs what a
            # uniform one with the mean row count does.
            changed |= self.cost.observe(Sample("draft", sum(feedback.num_drafted) / steps, steps,
                                                context, feedback.draft_seconds))
        return changed
