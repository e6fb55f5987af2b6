"""SpecServe (arXiv 2503.05096), the load-adaptive policy, with what serving taught us.

Each step, for every cap k up to what the scheduler allows, predict the batch's goodput

    G(k) = sum_i N(m_i, min(k, cap_i)) / T(B, k, L_max)  x  correction(B, k)

with m_i each request's acceptance estimate (seeded from the acceptance measured for its
drafter, learned.py), N shaped by the acceptance measured at each draft depth, T the cost model of the padded shapes the workers run, and the
correction the observed / predicted goodput of that (batch, k) so far. The cap is the
best k among those that keep every request within its TPOT budget; in-loop, rows then
stop early and the verifier trims with live confidences (control.DraftControl), but only
while observation agrees with the profile's marginal costs, which those rules rely on and
the per-cap correction never reaches (`_trusts_profile`); otherwise every row drafts to
the cap and all of it is verified (the draft worker's fast path, no policy time in it).

* The SLO cap, per request: a step of T seconds emits about N(m_i, k) tokens for
  request i, which may also spend the slack it has banked (seconds ahead of its
  budget). k fits when (T - slack_i) / (N_i tpot_i) <= 1 for every request. When none
  fits, the k with the least worst overrun, i.e. the least time per emitted token
  against the budget, not plain decoding by default (which may well be slower).
* The budget it shares with prompts (`speculation.yield_to_prompts`, off by default):
  while waiting prompts need the step's token budget to meet their TTFT, the chooser
  lowers the caps this policy chooses within so drafted tokens take only what those
  prompts do not need; rows behind their TPOT budget keep theirs (policy/prefill_share.py).
* Exploration: while k = 0 is chosen, every `probe_every`-th plain step drafts k = 1
  for every row and verifies it all, so the acceptance, the calibration and the
  goodput of k = 1 keep being measured; the interval doubles (to `max_probe_every`)
  while probes keep confirming k = 0 and resets when speculation resumes. While
  speculating, every `probe_every`-th step tries a neighbouring cap (k - 1, then k + 1)
  whose goodput at this batch size has been seen fewer than `neighbour_samples`
  times: a cost model wrong about some shapes is caught where it matters, by measuring
  the alternatives next to what it chose (a hill climb on observed goodput).
"""
from __future__ import annotations

import math

import numpy as np

from specserve_ray.policy.cap_goodput import (best_cap, cap_outlook, predicted_goodput,
                                              slo_feasible_k)
from specserve_ray.policy.contracts import (BatchState, Decision, SpeculationPolicy, StepFeedback,
                                            uses_draft_model)
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy.cost_model import CostModel

__all__ = ["SpecServe", "slo_feasible_k", "predicted_goodput"]

# Batches with at most this many (row, depth) pairs decide on floats (cap_goodput.py:
# the same arithmetic, without numpy's per-call cost on tiny arrays); larger ones on arrays.
FLOAT_PATH_MAX = 32     # the measured crossover on this CPU (scripts/bench_policy_cpu.py)


class SpecServe(SpeculationPolicy):
    """Load-adaptive speculation from a cost model, measured goodput and live confidences."""

    name = "specserve"
    shares_budget_with_prefill = True

    def __init__(self, cost: CostModel, max_k: int = 8, *, enforce_slo: bool = True,
                 calibrate: bool = True, correct_goodput: bool = True, probe_every: int = 4,
                 max_probe_every: int = 64, neighbour_samples: int = 3,
                 in_loop: bool | None = None, trust_tolerance: float = math.log(1.25),
                 learned=None):
        super().__init__(max_k, learned)
        self.cost = cost
        if self.learned.cost is None:
            self.learned.cost = cost
        self.enforce_slo = enforce_slo
        self.use_calibration = calibrate
        self.correct_goodput = correct_goodput   # off only to show what the correction buys
        self.probe_every = self.min_probe_every = max(probe_every, 1)
        self.max_probe_every = max(max_probe_every, self.probe_every)
        self.neighbour_samples = neighbour_samples
        self.in_loop = in_loop                  # None: while the profile holds (see _trusts_profile)
        self.trust_tolerance = trust_tolerance  # log ratio the profile's shape may be off by
        self._plain_streak = 0
        self._since_probe = 0

    def choose_cap(self, state: BatchState, confidence: np.ndarray) -> int:
        """The uniform cap k for this step (0 = plain decoding)."""
        max_k = min(max(max(state.k_cap, default=0), 0), self.max_k)
        if max_k <= 0 or (state.uses_draft_model and not self.cost.has_draft):
            return 0
        # Deeper draft tokens are accepted less often than the first (the draft drifts):
        # the measured acceptance per depth shapes each request's expected tokens.
        acceptance = self.learned.acceptance_of(state.drafter)
        if state.batch_size * max_k <= FLOAT_PATH_MAX:
            return self._choose_cap_floats(state, confidence, max_k,
                                           acceptance.depth_profile_floats(max_k))
        depth = acceptance.depth_profile(max_k)
        if self.correct_goodput:
            # Against the profiled laws (fixed), times what each cap k really delivered.
            tokens, seconds, goodput = predicted_goodput(self.cost.reference(), state,
                                                         confidence, max_k, depth)
            factors = self.learned.goodput.factors(state.batch_size, max_k)
            goodput, seconds = goodput * factors, seconds / factors
        else:
            tokens, seconds, goodput = predicted_goodput(self.cost, state, confidence, max_k,
                                                         depth)
        if self.enforce_slo and state.tpot_budget_s is not None:
            fits, worst = slo_feasible_k(seconds, tokens, state.tpot_budget_s, state.tpot_slack_s)
            if not fits.any():
                return int(np.argmin(worst))
            goodput = np.where(fits, goodput, -np.inf)
        return int(np.argmax(goodput))      # the first of equals: the shallowest

    def _choose_cap_floats(self, state: BatchState, confidence: np.ndarray, max_k: int,
                           depth: list[float]) -> int:
        """`choose_cap` for a small batch: the same decision, computed on floats."""
        batch = state.batch_size
        cost = self.cost.reference() if self.correct_goodput else self.cost
        tokens, seconds, goodput = cap_outlook(cost, batch, [max(c, 0) for c in state.k_cap],
                                               state.max_context, confidence.tolist(),
                                               depth, max_k, state.uses_draft_model)
        if self.correct_goodput:
            factors = self.learned.goodput.factors(batch, max_k).tolist()
            goodput = [g * f for g, f in zip(goodput, factors)]
            seconds = [s / f for s, f in zip(seconds, factors)]
        budgets = state.tpot_budget_s if self.enforce_slo else None
        return best_cap(tokens, seconds, goodput, budgets, state.tpot_slack_s)

    def _decide(self, state, confidence):
        caps = [min(max(c, 0), self.max_k) for c in state.k_cap]
        k = self.choose_cap(state, confidence)
        if k == 0:
            self._plain_streak += 1
            if self._plain_streak < self.probe_every:
                return [0] * len(caps), None, False
            # Probe: k = 1, drafted and verified in full, to measure what k = 0 forgoes.
            self._plain_streak = 0
            self.probe_every = min(2 * self.probe_every, self.max_probe_every)
            return [min(c, 1) for c in caps], None, True
        self._plain_streak, self.probe_every = 0, self.min_probe_every
        self._since_probe += 1
        if self._since_probe >= self.min_probe_every:
            goodput, batch = self.learned.goodput, state.batch_size
            for other in (k - 1, k + 1):
                if 0 <= other <= max(caps) and goodput.seen(batch, other) < self.neighbour_samples:
                    self._since_probe = 0
                    return [min(c, other) for c in caps], None, True
        if not (self.in_loop if self.in_loop is not None else self._trusts_profile(state.batch_size)):
            return [min(c, k) for c in caps], None, False   # draft to the cap, verify it all
        table = self.learned.calibration_of(state.drafter).table() if self.use_calibration else None
        control = DraftControl(stop="efficiency", trim="efficiency", cost=self.cost,
                               mean_confidence=confidence, context=state.max_context,
                               calibration=table, min_draft=1)
        return [min(c, k) for c in caps], control, False

    def _trusts_profile(self, batch: int) -> bool:
        """Whether the in-loop rules may run: they weigh one more draft or verified token
        with the profiled *marginal* costs, which the observed-goodput correction (per cap
        k, applied to the cap above) never reaches. Trusted while observation agrees with
        the profile's shape: the corrections of different caps at this batch size within
        `trust_tolerance` of each other, and the draft and verify laws off by about the
        same factor. On an engine whose verify cost is flat in the token count, or whose
        draft worker costs far more per call than the profiled forwards, the rules stop
        drafts and trim verifies that cost nothing to keep (and cost policy time inside
        the timed draft loop): measured, scripts/measure_policies.py, README."""
        scale = self.cost.scale
        skew = abs(math.log(max(scale["draft"], 1e-9) / max(scale["verify"], 1e-9)))
        return skew <= self.trust_tolerance and \
            self.learned.goodput.spread(batch) <= self.trust_tolerance

    def calibration_table(self, drafter="model"):
        return super().calibration_table(drafter) if self.use_calibration else None

    def observe(self, feedback: StepFeedback, decision: Decision | None = None) -> bool:
        """Fold the step's observed speed into the correction of the cap it ran.

        Goodput is tokens over seconds. The tokens side is learned from the target's
        verdicts already (calibration, acceptance per depth: learned.py), so what is
        corrected here is the seconds: observed against the profiled laws for this batch
        size and cap. Comparing emitted tokens with the estimates that chose the cap
        would be biased: a cap is chosen when estimates are high (winner's curse).
        """
        if (decision is None or feedback.had_prefill or feedback.step_seconds <= 0
                or len(decision.max_k) != len(feedback.num_accepted)):
            return False
        batch, k = len(decision.max_k), max(decision.max_k)
        predicted = self.cost.reference().step_seconds(batch, [k], decision.context,
                                                       uses_draft_model(decision.drafter))[0]
        goodput = self.learned.goodput
        before = goodput.factor(batch, k)
        goodput.observe(batch, k, 1.0 / predicted, 1.0 / feedback.step_seconds)
        return abs(goodput.factor(batch, k) / before - 1.0) > 0.02
