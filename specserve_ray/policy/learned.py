"""What the engine learns while serving, whichever policy runs: one object per engine.

    learned = LearnedState(cost)           # the scheduler owns it; policies share it
    learned.observe(feedback)              # after every decode step (StepFeedback)
    learned.prior("model")                 # a new request's acceptance estimate
    learned.goodput.factor(batch, k)       # observed / predicted tokens per second

It outlives a policy switch (a policy instance is rebuilt on every reconfigure; what was
measured about the hardware and the drafter is not) and is saved with the cached profile
(profile.save_learned), so a restart starts from what the last run measured:

* per drafter, the acceptance rate at each draft depth (`DepthAcceptance`) and the
  confidence calibration (calibration.py);
* the cost model's corrections (its scale and step overhead live on the CostModel the
  scheduler also owns; `observe` feeds them);
* `GoodputCorrection`: per (batch bucket, k), how far the tokens per second actually
  observed sit from what the model predicted for that shape ("probe goodput, do not
  trust proxies"). Decisions multiply predicted goodput by it, so a model that is wrong
  about some shape is overruled by what that shape really did.

Pure numbers; no Ray, no I/O.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from specserve_ray.policy.calibration import ConfidenceCalibration
from specserve_ray.policy.cost_model import CostModel, padded_tokens

__all__ = ["DepthAcceptance", "GoodputCorrection", "LearnedState", "DEFAULT_DRAFTER"]

DEFAULT_DRAFTER = "model"
_MAX_DEPTH = 16
_MAX_LOG_RATIO = math.log(4.0)


class DepthAcceptance:
    """Per draft depth j: tokens the target tested there and accepted (decaying counts).

    A token at depth j is tested only if every earlier token of its row was accepted,
    so accepted[j] / tested[j] is the conditional acceptance at that depth. A prior of
    `prior_weight` tokens at `prior_rate` stands in until there is evidence.

    The counts are lists of floats, updated every step: at 16 depths and a handful of
    rows, numpy's per-call cost was most of what this spent (the arithmetic is the same).
    """

    def __init__(self, prior_rate: float = 0.5, prior_weight: float = 2.0, decay: float = 0.995):
        self.prior_rate, self.prior_weight, self.decay = prior_rate, prior_weight, decay
        self.tested = [0.0] * _MAX_DEPTH
        self.accepted = [0.0] * _MAX_DEPTH

    def observe(self, num_verified: Sequence[int], num_accepted: Sequence[int]) -> None:
        verified = [min(int(v), _MAX_DEPTH) for v in num_verified]
        if max(verified, default=0) <= 0:
            return
        accepted = [min(int(a), v) for a, v in zip(num_accepted, verified)]
        decay = self.decay
        tested = [t * decay for t in self.tested]
        hits = [a * decay for a in self.accepted]
        for j, n in enumerate(_rows_beyond([min(v, a + 1) for v, a in zip(verified, accepted)])):
            tested[j] += n
        for j, n in enumerate(_rows_beyond(accepted)):
            hits[j] += n
        self.tested, self.accepted = tested, hits

    def rate(self, depth: int = 0) -> float:
        """Conditional acceptance at `depth` (0 = a row's first draft token)."""
        j = min(max(depth, 0), _MAX_DEPTH - 1)
        return float((self.accepted[j] + self.prior_weight * self.prior_rate)
                     / (self.tested[j] + self.prior_weight))

    def depth_profile(self, max_k: int) -> np.ndarray:  # [max_k]
        """Acceptance at depths 0..max_k-1 relative to depth 0: how much harder a
        request's j-th draft token is to get accepted than its first."""
        return np.array(self.depth_profile_floats(max_k))

    def depth_profile_floats(self, max_k: int) -> list[float]:
        """`depth_profile` as a list."""
        mass, weight = self.prior_weight * self.prior_rate, self.prior_weight
        rates = [(self.accepted[j] + mass) / (self.tested[j] + weight)
                 for j in (min(j, _MAX_DEPTH - 1) for j in range(max_k))]
        if not rates:
            return rates
        first = max(rates[0], 1e-6)
        return [r / first for r in rates]

    @property
    def evidence(self) -> float:
        """Tokens tested at depth 0 (decayed): how much the rates are worth."""
        return float(self.tested[0])

    def to_dict(self) -> dict:
        return {"tested": np.round(self.tested, 4).tolist(),
                "accepted": np.round(self.accepted, 4).tolist()}

    def load(self, data: Mapping) -> None:
        for name in ("tested", "accepted"):
            values = np.asarray(data.get(name, ()), np.float64)[:_MAX_DEPTH]
            if values.size and np.isfinite(values).all() and (values >= 0).all():
                getattr(self, name)[:values.size] = values.tolist()


def _rows_beyond(levels: Sequence[int]) -> list[int]:
    """[max(levels)] how many of `levels` exceed each depth j (rows that reached j)."""
    width = max(levels, default=0)
    if width <= 0:
        return []
    reached = [0] * (width + 1)
    for n in levels:
        if n > 0:
            reached[n] += 1
    out, running = [0] * width, 0
    for j in range(width - 1, -1, -1):
        running += reached[j + 1]
        out[j] = running
    return out


def batch_bucket(batch: int) -> int:
    """log2 buckets: 1, 2, 3-4, 5-8, ... share a correction (nearby sizes behave alike)."""
    return int(math.ceil(math.log2(max(batch, 1))))


class GoodputCorrection:
    """EMA of log(observed / predicted tokens per second) per (batch bucket, k).

    `log_ratio` and `count` are read-only outside: `observe` and `load` also keep the
    cells grouped by bucket, which is what every per-step question reads.
    """

    def __init__(self, weight: float = 0.1, max_k: int = _MAX_DEPTH):
        self.weight = weight
        self.max_k = max_k
        self.log_ratio: dict[tuple[int, int], float] = {}
        self.count: dict[tuple[int, int], int] = {}
        self._by_bucket: dict[int, dict[int, float]] = {}    # bucket -> {k: log ratio}

    def _set(self, bucket: int, k: int, value: float) -> None:
        self.log_ratio[bucket, k] = value
        self._by_bucket.setdefault(bucket, {})[k] = value

    def observe(self, batch: int, k: int, predicted: float, observed: float) -> None:
        if not (predicted > 0 and observed > 0 and batch > 0 and 0 <= k <= self.max_k):
            return
        cell = (batch_bucket(batch), int(k))
        ratio = min(max(math.log(observed / predicted), -_MAX_LOG_RATIO), _MAX_LOG_RATIO)
        n = self.count.get(cell, 0)
        # The first few observations are averaged, later ones are an EMA (follows drift).
        w = max(self.weight, 1.0 / (n + 1))
        before = self.log_ratio.get(cell, 0.0)
        self._set(*cell, before + w * (ratio - before))
        self.count[cell] = n + 1

    def seen(self, batch: int, k: int) -> int:
        """Steps observed in the cell."""
        return self.count.get((batch_bucket(batch), int(k)), 0)

    def factor(self, batch: int, k: int) -> float:
        """Multiply predicted goodput at (batch, k) by this; 1 where nothing was seen."""
        return math.exp(self.log_ratio.get((batch_bucket(batch), int(k)), 0.0))

    def spread(self, batch: int) -> float:
        """max - min log correction over the k seen at this batch size (0 if fewer than
        two): how far the profile's *shape* (its marginal cost of one more token) is off,
        beyond a uniform factor that would change no comparison between caps."""
        values = self._by_bucket.get(batch_bucket(batch), {}).values()
        return max(values) - min(values) if len(values) >= 2 else 0.0

    def factors(self, batch: int, max_k: int) -> np.ndarray:  # [max_k + 1]
        """Per k. A k not seen at this batch size is read off the line through the
        nearest seen ones (a model wrong about one shape tends to be wrong the same way,
        and increasingly so, about the next: a trend of corrections is extrapolated so
        that exploration does not walk up every worse k one by one)."""
        seen = sorted(self._by_bucket.get(batch_bucket(batch), {}).items())
        if not seen:
            return np.ones(max_k + 1)
        # Piecewise linear through the seen cells, extended by the end segments' slopes;
        # written out on floats (a few points: numpy's per-call cost dominated), with
        # the arithmetic of np.interp, so the values are the ones it gives.
        xs, ys = [float(k) for k, _ in seen], [v for _, v in seen]
        last = len(xs) - 1
        low = (ys[1] - ys[0]) / (xs[1] - xs[0]) if last else 0.0
        high = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if last else 0.0
        values, j = [], 0
        for k in range(max_k + 1):
            if not last:
                value = ys[0]
            elif k < xs[0]:
                value = ys[0] + low * (k - xs[0])
            elif k >= xs[-1]:
                value = ys[-1] + high * (k - xs[-1]) if k > xs[-1] else ys[-1]
            else:
                while xs[j + 1] <= k:
                    j += 1
                value = ys[j] if xs[j] == k else \
                    (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j]) * (k - xs[j]) + ys[j]
            values.append(min(max(value, -_MAX_LOG_RATIO), _MAX_LOG_RATIO))
        return np.exp(np.array(values))

    def to_dict(self) -> dict:
        return {f"{b},{k}": [round(v, 6), self.count[b, k]] for (b, k), v in self.log_ratio.items()}

    def load(self, data: Mapping) -> None:
        for key, (value, count) in data.items():
            b, k = (int(x) for x in key.split(","))
            if math.isfinite(value):
                self._set(b, k, min(max(float(value), -_MAX_LOG_RATIO), _MAX_LOG_RATIO))
                self.count[b, k] = int(count)


class LearnedState:
    def __init__(self, cost: CostModel | None = None):
        self.cost = cost
        self.acceptance: dict[str, DepthAcceptance] = {}
        self.calibration: dict[str, ConfidenceCalibration] = {}
        self.goodput = GoodputCorrection()

    def acceptance_of(self, drafter: str = DEFAULT_DRAFTER) -> DepthAcceptance:
        found = self.acceptance.get(drafter)     # (setdefault would build one every call)
        if found is None:
            found = self.acceptance[drafter] = DepthAcceptance()
        return found

    def calibration_of(self, drafter: str = DEFAULT_DRAFTER) -> ConfidenceCalibration:
        found = self.calibration.get(drafter)
        if found is None:
            found = self.calibration[drafter] = ConfidenceCalibration()
        return found

    def prior(self, drafter: str = DEFAULT_DRAFTER, depth: int = 0) -> float:
        """What a request with no history of its own is expected to accept per token:
        the measured acceptance at `depth` for its drafter."""
        return self.acceptance_of(drafter).rate(depth)

    def observe(self, feedback) -> None:
        """One decode step's StepFeedback: acceptance, calibration, cost corrections."""
        verified = feedback.verified
        self.acceptance_of(feedback.drafter).observe(verified, feedback.num_accepted)
        if feedback.confidences is not None:
            self.calibration_of(feedback.drafter).observe(feedback.confidences, verified,
                                                          feedback.num_accepted)
        cost = self.cost
        if cost is None or feedback.batch_size is None:
            return
        batch, context = feedback.batch_size, feedback.context
        if feedback.verify_seconds is not None:
            cost.observe_call("verify", batch, padded_tokens(verified), context,
                              feedback.verify_seconds)
        steps = max(feedback.num_drafted, default=0)
        if feedback.draft_seconds is not None and steps > 0:
            # Per-step draft cost is affine in the rows, so a ragged call costs what a
            # uniform one with the mean row count does.
            cost.observe_call("draft", sum(feedback.num_drafted) / steps, steps, context,
                              feedback.draft_seconds)
        if not feedback.had_prefill and feedback.verify_seconds is not None:
            # What the step cost beside its two forwards (router, transport, bookkeeping).
            cost.observe_step_overhead(max(feedback.step_seconds - (feedback.draft_seconds or 0.0)
                                           - feedback.verify_seconds, 0.0))

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": 1,
                "acceptance": {d: a.to_dict() for d, a in self.acceptance.items()},
                "calibration": {d: {"tested": np.round(c.tested, 4).tolist(),
                                    "accepted": np.round(c.accepted, 4).tolist()}
                                for d, c in self.calibration.items()},
                "goodput": self.goodput.to_dict()}

    def load(self, data: Mapping | None) -> "LearnedState":
        """Take what a saved state holds; a malformed one is ignored (start afresh)."""
        if not data or data.get("format") != 1:
            return self
        try:
            for drafter, entry in dict(data.get("acceptance", {})).items():
                self.acceptance_of(drafter).load(entry)
            for drafter, entry in dict(data.get("calibration", {})).items():
                cal = self.calibration_of(drafter)
                for name in ("tested", "accepted"):
                    values = np.asarray(entry.get(name, ()), np.float64)
                    if values.shape == (cal.bins,) and np.isfinite(values).all():
                        setattr(cal, name, values.tolist())
                cal._table = None
            self.goodput.load(dict(data.get("goodput", {})))
        except (TypeError, ValueError, AttributeError):
            pass
        return self
