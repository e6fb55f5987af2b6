"""The policy interface and what crosses it: BatchState in, Decision out, StepFeedback back.

    decision = policy.decide(state)         # per-request caps + in-loop rules (DraftControl)
    ...the draft worker runs decision.control; the target verifies...
    confidence = policy.observe_step(plan, result, seconds, decision, confidence)

`observe_step` assembles the policy's own feedback from the step's messages
(`StepFeedback.from_step`), feeds the engine's learned state (learned.py) and returns
each row's updated confidence estimate; the scheduler only stores it on the request.
The caps a policy may choose within arrive in `BatchState.k_cap`, computed by
`SpeculationChooser._final_ks` (speculation_choice.py, the one place k is clamped):
policies never clamp again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from specserve_ray.policy.calibration import apply_table
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy.efficiency import as_array, draft_mask
from specserve_ray.policy.learned import DEFAULT_DRAFTER, LearnedState

__all__ = ["BatchState", "Decision", "StepFeedback", "SpeculationPolicy", "update_confidence_ema",
           "uses_draft_model"]

# Steps with at most this many draft confidences (and fewer than 8 per row) update the
# confidence estimates on floats (`update_confidence_floats`), larger ones on arrays.
FLOAT_CONFIDENCES_MAX = 40


@dataclass(frozen=True)
class BatchState:
    """What a policy sees before a step: one entry per running request, plus the load."""

    context_len: tuple[int, ...]         # tokens in each request's KV cache
    k_cap: tuple[int, ...]               # the most each request may draft (scheduler's caps)
    confidence_ema: tuple[float | None, ...]   # running mean acceptance estimate; None = new
    tpot_budget_s: tuple[float, ...] | None = None  # each request's TPOT SLO; None = no SLO
    tpot_slack_s: tuple[float, ...] | None = None   # seconds each is ahead (+) of its budget
    queue_depth: int = 0                 # requests waiting for admission
    drafter: str = DEFAULT_DRAFTER       # whose acceptance statistics apply (the rows'
                                         # drafter; "model+ngram" when they differ)

    def __post_init__(self):
        for name in ("context_len", "k_cap", "confidence_ema", "tpot_budget_s", "tpot_slack_s"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        sizes = {len(self.context_len), len(self.k_cap), len(self.confidence_ema)}
        for name in ("tpot_budget_s", "tpot_slack_s"):
            if getattr(self, name) is not None:
                sizes.add(len(getattr(self, name)))
        if len(sizes) != 1:
            raise ValueError("BatchState per-request fields must have one entry per request")

    @property
    def batch_size(self) -> int:
        return len(self.context_len)

    @cached_property
    def max_context(self) -> float:
        """The longest context: what every row's attention spans in a padded forward."""
        return float(max(self.context_len, default=0))

    @cached_property
    def caps(self) -> np.ndarray:  # [B] int64
        return np.maximum(np.asarray(self.k_cap, np.int64), 0)

    def confidence(self, prior: float) -> np.ndarray:  # [B] float64
        """Per-request estimates, `prior` for requests that have none yet."""
        return np.array([prior if c is None else c for c in self.confidence_ema], np.float64)

    @property
    def uses_draft_model(self) -> bool:
        """Whether drafting costs draft-model forwards: n-gram proposals cost none (a step
        is one target forward), so the step-time laws leave the draft out for them."""
        return uses_draft_model(self.drafter)

    @cached_property
    def tightest_tpot(self) -> float:
        return min(self.tpot_budget_s, default=math.inf) if self.tpot_budget_s else math.inf


@dataclass(frozen=True)
class Decision:
    """A policy's answer for one step."""

    max_k: tuple[int, ...]                # per request: draft at most this many tokens
    control: DraftControl | None = None   # the in-loop stop/trim rules; None = draft to
                                          # max_k, verify all (the draft worker's fast path)
    probe: bool = False                   # an exploration step (k >= 1 while 0 was chosen)
    confidence: tuple[float, ...] = ()    # the per-request estimates it decided with
    context: float = 0.0                  # the batch's longest context at decision time
    drafter: str = DEFAULT_DRAFTER        # BatchState.drafter: whose statistics it used

    @property
    def speculates(self) -> bool:
        """False means a plain decoding step: no draft call at all."""
        return any(k > 0 for k in self.max_k)


@dataclass(frozen=True)
class StepFeedback:
    """What one decode step did (built by `from_step` from the step's messages)."""

    num_drafted: tuple[int, ...]          # per request, draft tokens produced
    num_accepted: tuple[int, ...]         # per request, draft tokens the target accepted
    step_seconds: float                   # the whole step as the step loop saw it
    num_verified: tuple[int, ...] | None = None   # sent to the target; None = all drafted
    draft_seconds: float | None = None    # the draft call alone, if measured
    verify_seconds: float | None = None   # the target forward alone, if measured
    confidences: Any = None               # [B, K] per-token draft confidences, if kept
    batch_size: int | None = None
    context: float = 0.0                  # longest context of the step's rows
    had_prefill: bool = False             # prefill chunks shared the step (time is mixed)
    drafter: str = DEFAULT_DRAFTER

    @property
    def verified(self) -> tuple[int, ...]:
        return self.num_drafted if self.num_verified is None else self.num_verified

    @property
    def emitted(self) -> int:
        return sum(self.num_accepted) + len(self.num_accepted)

    @classmethod
    def from_step(cls, plan, result, seconds: float, context: float,
                  drafter: str = DEFAULT_DRAFTER) -> "StepFeedback":
        """From a StepPlan and its StepResult (specserve_ray.contracts); `drafter` is
        the label the step was decided under (Decision.drafter)."""
        verify, proposal = result.verify, result.proposal
        if proposal is not None:
            drafted = _int_tuple(proposal.drafted)
            verified = _int_tuple(proposal.num_draft_tokens)
            confidences = proposal.draft_confidence.numpy() \
                if proposal.draft_confidence.shape[1] > 0 else None
        else:   # a plain step, or a failed draft that fell back to plain
            drafted = verified = (0,) * len(plan.decode_ids)
            confidences = None
        return cls(num_drafted=drafted, num_accepted=_int_tuple(verify.num_accepted),
                   step_seconds=seconds, num_verified=verified,
                   draft_seconds=proposal.seconds if proposal is not None else None,
                   # A step with prompt chunks shares the target forward with them
                   # (workers/target.py prefill_and_verify): no verify-alone time then.
                   verify_seconds=None if plan.prefill else verify.seconds,
                   confidences=confidences,
                   batch_size=len(plan.decode_ids), context=context,
                   had_prefill=bool(plan.prefill), drafter=drafter)


def uses_draft_model(drafter: str) -> bool:
    """Whether a drafter label's proposals cost draft-model forwards (all but "ngram")."""
    return drafter != "ngram"


def _int_tuple(values) -> tuple[int, ...]:
    """A [B] tensor, array or sequence as Python ints (one `tolist`, not B tensor reads)."""
    return tuple(int(v) for v in (values.tolist() if hasattr(values, "tolist") else values))


def update_confidence_ema(ema, draft_confidences, num_drafted, *, prior: float,
                          weight: float = 0.3, relax: float = 0.1) -> np.ndarray:  # [B]
    """Per-request acceptance estimate, the m_i the drafter and the caps use.

    Rows that drafted move toward the mean calibrated confidence of this step's tokens:
    the live signal of how hard the text is now, read through the curve the target's
    verdicts taught (calibration.py; probes keep teaching it while k = 0). Rows that did
    not draft relax toward `prior`, the acceptance measured for their drafter: an
    estimate that fell so low that speculation stopped would otherwise never move again.
    """
    ema = as_array(ema).copy()
    counts = as_array(num_drafted, np.int64)
    if counts.size and counts.max() > 0:
        probs = as_array(draft_confidences)
        mask = draft_mask(counts, probs.shape[1])
        mean = np.where(mask, probs, 0.0).sum(axis=1) / np.maximum(counts, 1)
        ema = np.where(counts > 0, (1 - weight) * ema + weight * mean, ema)
    idle = counts == 0
    ema[idle] += relax * (prior - ema[idle])
    return ema


def update_confidence_floats(ema: Sequence[float], draft_confidences: list[list[float]] | None,
                             num_drafted: Sequence[int], table: tuple[float, ...] | None, *,
                             prior: float, weight: float = 0.3, relax: float = 0.1
                             ) -> list[float]:
    """`update_confidence_ema` for a step with fewer than 8 confidences per row, on
    floats, calibrating through `table` (None = the raw probabilities) on the way: the
    same arithmetic in the same order (numpy sums fewer than 8 values left to right),
    without numpy's per-call cost on a handful of values."""
    rows = draft_confidences if draft_confidences is not None and \
        max(num_drafted, default=0) > 0 else None
    out, bins = [], len(table) if table is not None else 0
    for i, (value, count) in enumerate(zip(ema, num_drafted)):
        if count > 0:
            total = 0.0
            for p in (rows[i][:count] if rows is not None else ()):
                if table is not None:       # apply_table's rule, on one float
                    p = table[min(int((0.0 if p != p else min(max(p, 0.0), 1.0)) * bins),
                                  bins - 1)]
                total += p
            value = (1 - weight) * value + weight * (total / count)
        elif count == 0:
            value += relax * (prior - value)
        out.append(float(value))
    return out


class SpeculationPolicy:
    """Base: the step protocol. Subclasses implement `_decide`; `observe` is optional."""

    name = "policy"
    # Whether the chooser may lower this policy's caps so drafted tokens leave waiting
    # prompts the budget their TTFT needs (policy/prefill_share.py; switched on with
    # speculation.yield_to_prompts). Off for the baselines: they are the field's rules as
    # published, and fixed k stays fixed.
    shares_budget_with_prefill = False

    def __init__(self, max_k: int = 8, learned: LearnedState | None = None):
        if max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {max_k}")
        self.max_k = max_k              # the most this policy ever asks a request to draft
        self.learned = learned if learned is not None else LearnedState()

    def decide(self, state: BatchState) -> Decision:
        confidence = state.confidence(self.learned.prior(state.drafter))
        if max(state.k_cap, default=0) <= 0:      # no row may draft (or no rows)
            return Decision((0,) * state.batch_size, confidence=tuple(confidence.tolist()),
                            context=state.max_context, drafter=state.drafter)
        ks, control, probe = self._decide(state, confidence)
        ks = _int_tuple(ks)
        if not any(ks):
            control = None
        return Decision(ks, None if control is None or control.is_trivial else control, probe,
                        tuple(confidence.tolist()), state.max_context, state.drafter)

    def _decide(self, state: BatchState, confidence: np.ndarray
                ) -> tuple[Sequence[int], DraftControl | None, bool]:
        """Per-request k (within state.caps), the in-loop rules, whether it is a probe."""
        raise NotImplementedError

    def calibration_table(self, drafter: str = DEFAULT_DRAFTER) -> tuple[float, ...] | None:
        """The learned curve from draft confidence to acceptance (None = take the
        draft's probability at its word)."""
        return self.learned.calibration_of(drafter).table()

    def calibrate(self, draft_confidences, drafter: str = DEFAULT_DRAFTER) -> np.ndarray:
        """Draft confidences as acceptance probabilities, through the learned curve."""
        table = self.calibration_table(drafter)
        if table is None:
            return as_array(draft_confidences)
        return apply_table(table, draft_confidences)

    def observe_step(self, plan, result, seconds: float, decision: Decision | None,
                     confidence: Sequence[float | None]) -> list[float]:
        """Learn from one applied decode step; the rows' updated confidence estimates."""
        context = decision.context if decision is not None else 0.0
        drafter = decision.drafter if decision is not None else DEFAULT_DRAFTER
        feedback = StepFeedback.from_step(plan, result, seconds, context, drafter)
        self.learned.observe(feedback)
        prior = self.learned.prior(feedback.drafter)
        current = [prior if c is None else c for c in confidence]
        confidences = feedback.confidences
        if confidences is None or (confidences.shape[1] < 8
                                   and confidences.size <= FLOAT_CONFIDENCES_MAX):
            ema = update_confidence_floats(
                current, None if confidences is None else confidences.tolist(),
                feedback.num_drafted, self.calibration_table(feedback.drafter), prior=prior)
        else:
            ema = update_confidence_ema(current, self.calibrate(confidences, feedback.drafter),
                                        feedback.num_drafted, prior=prior).tolist()
        self.observe(feedback, decision)
        return ema

    def observe(self, feedback: StepFeedback, decision: Decision | None = None) -> bool:
        """Policy-specific learning; True if the policy's parameters moved."""
        return False
