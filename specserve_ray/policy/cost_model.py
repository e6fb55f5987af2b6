"""Step-time model: how long drafting and verification take on this hardware.

A worker times a bounded grid of shapes at start-up (`profile_grid`; the timing itself
lives with the workers), `CostModel.fit` turns the samples into two small linear laws,
and `observe` keeps correcting them from live steps. The result is cached on disk under
`CostModel.key(...)` so a restart with the same model, dtype, device and library
versions skips the profile.

    T_verify(B, n, L) = v0 + v1 B + v2 n + v3 B L + v4 n L    n = B W tokens in the forward
    T_draft(B, k, L)  = d0 [k > 0] + k (d1 + d2 B + d3 B L)    k sequential draft steps

The shapes are the ones the workers really run (models/runner.py, core/ragged.py): one
verify forward pads every row to the longest, W = max_i(k_i + 1), and attends over the
longest context, L = max_i(L_i) (the mask is [B, 1, W, L + W]). So n is B W, not
sum_i(k_i + 1): trimming one row's draft saves verify time only if it shortens the
longest row (`padded_tokens`). Callers pass the batch's longest context as L.

Why these features: a forward pass has a fixed launch/transport cost (v0, d0), a
per-sequence cost (B), a per-token compute cost (n), a read of every cached key (B L)
and the attention products of every query with every key (n L). At small batch the
per-token term is tiny (memory-bound: the weights are read once whatever n is); at
large batch it dominates (compute-bound). The draft's call overhead d0 is paid once per
step however many draft steps run, which is what makes "draft one more token" cheaper
than "start drafting". Fits are non-negative (a feature whose weight would come out
negative is dropped), so a prediction never falls as a shape grows.

Online correction is an EMA of log(observed / predicted) per kind, applied as a
multiplicative scale. It is cheap, cannot be destabilized by a burst of outliers (each
observation's ratio is clipped to [1/4, 4]) and follows slow drifts (thermal limits, a
neighbour on the device). It cannot reshape the curve; a shape change needs a new
profile (`fit`). The scale actually used moves only when the estimate drifts more than
`correction_tolerance` from it, so `observe` can say truthfully whether predictions
changed.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Sample", "CostModel", "profile_grid", "padded_tokens"]

VERIFY_FEATURES = ("intercept", "batch", "tokens", "batch*context", "tokens*context")
DRAFT_FEATURES = ("call", "steps", "steps*batch", "steps*batch*context")
_MIN_SECONDS = 1e-6          # predictions never reach 0: efficiencies divide by them
_MAX_LOG_RATIO = math.log(4.0)


@dataclass(frozen=True)
class Sample:
    """One timed call."""

    kind: str          # "draft" | "verify"
    batch: int         # requests in the call
    tokens: int        # verify: tokens in the forward, padded (B W); draft: draft steps k
    context: float     # longest context in the call (tokens already in a KV cache)
    seconds: float     # wall time of the call

    def __post_init__(self):
        if self.kind not in ("draft", "verify"):
            raise ValueError(f"sample kind must be 'draft' or 'verify', got {self.kind!r}")


def padded_tokens(num_draft) -> int:
    """Tokens one verify forward really computes for per-row draft counts: B max(k + 1)."""
    num_draft = list(num_draft)
    return len(num_draft) * (max(num_draft, default=0) + 1)


def _verify_features(batch, tokens, context) -> np.ndarray:  # [..., 5]
    batch, tokens, context = np.broadcast_arrays(*(np.asarray(x, np.float64)
                                                   for x in (batch, tokens, context)))
    return np.stack([np.ones_like(batch), batch, tokens, batch * context, tokens * context],
                    axis=-1)


def _draft_features(batch, steps, context) -> np.ndarray:  # [..., 4]
    batch, steps, context = np.broadcast_arrays(*(np.asarray(x, np.float64)
                                                  for x in (batch, steps, context)))
    return np.stack([(steps > 0).astype(np.float64), steps, steps * batch,
                     steps * batch * context], axis=-1)


def _fit_relative(features: np.ndarray, seconds: np.ndarray) -> tuple[float, ...]:
    # Dividing each row by its target makes least squares minimize *relative* error, so
    # the 1 ms shapes matter as much as the 100 ms ones; column scaling keeps lstsq
    # well conditioned when B*L is 10^5 times the intercept column.
    weighted = features / seconds[:, None]
    scale = np.abs(weighted).max(axis=0)
    scale[scale == 0] = 1.0
    columns = list(range(features.shape[1]))
    coef = np.zeros(features.shape[1])
    while columns:   # active set: drop the most negative weight, refit the rest
        sub, *_ = np.linalg.lstsq(weighted[:, columns] / scale[columns], np.ones_like(seconds),
                                  rcond=None)
        if (sub >= 0).all():
            coef[columns] = sub / scale[columns]
            break
        columns.pop(int(np.argmin(sub)))
    return tuple(float(c) for c in coef)


class CostModel:
    """Predicts draft and verify seconds from (batch, tokens, context); see module doc."""

    def __init__(self, verify_coef: Sequence[float] | None = None,
                 draft_coef: Sequence[float] | None = None, *,
                 correction_weight: float = 0.1, correction_tolerance: float = 0.02):
        self.verify_coef = self._checked(verify_coef, "verify")
        self.draft_coef = self._checked(draft_coef, "draft")
        self.correction_weight = correction_weight        # EMA weight of one observation
        self.correction_tolerance = correction_tolerance  # relative move before applying
        self._log_scale = {"verify": 0.0, "draft": 0.0}   # EMA estimate
        self.scale = {"verify": 1.0, "draft": 1.0}        # what predictions use
        # Seconds every step costs beside the two forwards (router, transport, sampling
        # bookkeeping), whatever k is: learned while serving (observe_step_overhead),
        # not profiled, since the profile times the models alone.
        self.step_overhead = 0.0

    @staticmethod
    def _checked(coef, kind):
        if coef is None:
            return None
        coef = tuple(float(c) for c in coef)
        if kind == "verify" and len(coef) == 4:
            coef += (0.0,)          # the 4-term law: no per-query attention term
        if len(coef) != (5 if kind == "verify" else 4):
            raise ValueError(f"{kind} coefficients: wrong count ({len(coef)})")
        return coef

    # -- fitting -----------------------------------------------------------------------
    def fit(self, samples: Iterable[Sample]) -> "CostModel":
        """Least-squares fit of both laws from profiled samples; resets the correction."""
        samples = list(samples)
        verify = [s for s in samples if s.kind == "verify"]
        draft = [s for s in samples if s.kind == "draft" and s.tokens > 0]
        if not verify:
            raise ValueError("cannot fit a cost model without verify samples")
        self.verify_coef = _fit_relative(
            _verify_features([s.batch for s in verify], [s.tokens for s in verify],
                             [s.context for s in verify]),
            np.array([max(s.seconds, _MIN_SECONDS) for s in verify]))
        if draft:
            self.draft_coef = _fit_relative(
                _draft_features([s.batch for s in draft], [s.tokens for s in draft],
                                [s.context for s in draft]),
                np.array([max(s.seconds, _MIN_SECONDS) for s in draft]))
        self._log_scale = {"verify": 0.0, "draft": 0.0}
        self.scale = {"verify": 1.0, "draft": 1.0}
        return self

    def reference(self) -> "CostModel":
        """The profiled laws without the online scale (same step overhead): a fixed yard-
        stick that observed goodput can be compared with over time (learned.py)."""
        twin = getattr(self, "_reference", None)
        if twin is None or twin.verify_coef != self.verify_coef or twin.draft_coef != self.draft_coef:
            twin = self._reference = CostModel(self.verify_coef, self.draft_coef)
        twin.step_overhead = self.step_overhead
        return twin

    @property
    def has_draft(self) -> bool:
        return self.draft_coef is not None

    # -- prediction (scalars or numpy arrays; broadcasting) ----------------------------
    def predict_verify(self, batch, tokens, context):
        """Seconds of one target forward of `tokens` (padded: B W) tokens over `batch`
        rows whose longest context is `context`."""
        if self.verify_coef is None:
            raise RuntimeError("cost model has no verify law; fit() or from_dict() first")
        v0, v1, v2, v3, v4 = self.verify_coef
        raw = v0 + v1 * batch + v2 * tokens + v3 * batch * context + v4 * tokens * context
        return np.maximum(raw * self.scale["verify"], _MIN_SECONDS)

    def predict_draft_step(self, batch, context):
        """Seconds of one draft step over `batch` rows, without the per-call overhead.

        0 where batch == 0, so a sum over per-step active counts is the ragged cost.
        """
        if self.draft_coef is None:
            raise RuntimeError("cost model has no draft law; fit() with draft samples first")
        _, d1, d2, d3 = self.draft_coef
        raw = (d1 + d2 * batch + d3 * batch * context) * self.scale["draft"]
        return np.where(np.asarray(batch) > 0, np.maximum(raw, _MIN_SECONDS), 0.0)

    @property
    def draft_overhead(self) -> float:
        """Seconds a draft call costs once, however many steps it runs."""
        if self.draft_coef is None:
            return 0.0
        return max(self.draft_coef[0], 0.0) * self.scale["draft"]

    def predict_draft(self, batch, steps, context):
        """Seconds of `steps` sequential draft steps over `batch` rows (0 when steps == 0)."""
        steps = np.asarray(steps, np.float64)
        return np.where(steps > 0, self.draft_overhead
                        + steps * self.predict_draft_step(batch, context), 0.0)

    def predict_draft_ragged(self, active_counts: Sequence[int], context: float) -> float:
        """Seconds of a draft call whose step j ran active_counts[j] rows."""
        if self.draft_coef is None:
            raise RuntimeError("cost model has no draft law; fit() with draft samples first")
        # Plain floats: this runs after every draft step, and the lists are short.
        _, d1, d2, d3 = self.draft_coef
        scale, steps = self.scale["draft"], [n for n in active_counts if n > 0]
        if not steps:
            return 0.0
        return self.draft_overhead + sum(max((d1 + d2 * n + d3 * n * context) * scale, _MIN_SECONDS)
                                         for n in steps)

    def predict_step(self, batch, num_draft, context, drafts: bool = True):
        """Seconds of a step where every request drafts `num_draft` tokens, then verifies.
        `drafts=False`: the tokens cost no draft forward (n-gram proposals)."""
        draft = self.predict_draft(batch, num_draft, context) if self.has_draft and drafts else 0.0
        return draft + self.step_overhead + self.predict_verify(
            batch, np.asarray(batch) * (np.asarray(num_draft) + 1), context)

    # -- the same laws on plain floats (the per-step hot path) ---------------------------
    # A policy asks for a handful of shapes every step; numpy's per-call overhead on
    # 1-9 element arrays costs more than the arithmetic. These twins evaluate the very
    # expressions above in the same order, so they return the same floats.
    def verify_seconds(self, batch: int, tokens: int, context: float) -> float:
        v0, v1, v2, v3, v4 = self.verify_coef
        raw = v0 + v1 * batch + v2 * tokens + v3 * batch * context + v4 * tokens * context
        return max(raw * self.scale["verify"], _MIN_SECONDS)

    def draft_seconds(self, batch, steps: int, context: float) -> float:
        if steps <= 0 or self.draft_coef is None:
            return 0.0
        d0, d1, d2, d3 = self.draft_coef
        scale = self.scale["draft"]
        per_step = max((d1 + d2 * batch + d3 * batch * context) * scale, _MIN_SECONDS) \
            if batch > 0 else 0.0
        return max(d0, 0.0) * scale + float(steps) * per_step

    def step_seconds(self, batch: int, widths: Sequence[int], context: float,
                     drafts: bool = True) -> list[float]:
        """`predict_step(batch, w, context, drafts)` for each uniform draft width w, as
        floats. The terms that do not depend on w are evaluated once, as the same partial
        sums."""
        v0, v1, v2, v3, v4 = self.verify_coef
        start, per_context = v0 + v1 * batch, v3 * batch * context
        scale, overhead = self.scale["verify"], self.step_overhead
        draft_call = draft_step = 0.0
        if self.draft_coef is not None and drafts:
            d0, d1, d2, d3 = self.draft_coef
            d_scale = self.scale["draft"]
            draft_call = max(d0, 0.0) * d_scale
            if batch > 0:
                draft_step = max((d1 + d2 * batch + d3 * batch * context) * d_scale, _MIN_SECONDS)
        out = []
        for w in widths:
            tokens = batch * (w + 1)
            raw = start + v2 * tokens + per_context + v4 * tokens * context
            draft = draft_call + float(w) * draft_step if w > 0 else 0.0
            out.append(draft + overhead + max(raw * scale, _MIN_SECONDS))
        return out

    def observe_step_overhead(self, seconds: float, weight: float = 0.1) -> None:
        """Fold one step's time outside the forwards into the overhead estimate (EMA)."""
        if seconds >= 0 and math.isfinite(seconds):
            self.step_overhead += weight * (seconds - self.step_overhead)

    def _predict(self, sample: Sample) -> float:
        return self._predict_call(sample.kind, sample.batch, sample.tokens, sample.context)

    def _predict_call(self, kind: str, batch, tokens: int, context: float) -> float:
        if kind == "verify":
            if self.verify_coef is None:
                raise RuntimeError("cost model has no verify law; fit() or from_dict() first")
            return self.verify_seconds(batch, tokens, context)
        if self.draft_coef is None:
            raise RuntimeError("cost model has no draft law; fit() with draft samples first")
        return self.draft_seconds(batch, tokens, context)

    # -- online correction -------------------------------------------------------------
    def observe(self, sample: Sample) -> bool:
        """Fold one live timing into the correction; True if predictions changed."""
        return self.observe_call(sample.kind, sample.batch, sample.tokens, sample.context,
                                 sample.seconds)

    def observe_call(self, kind: str, batch, tokens: int, context: float, seconds: float) -> bool:
        """`observe` without building a Sample (the per-step path)."""
        if kind not in ("draft", "verify"):
            raise ValueError(f"sample kind must be 'draft' or 'verify', got {kind!r}")
        if seconds <= 0 or (kind == "draft" and tokens <= 0):
            return False
        if kind == "draft" and not self.has_draft:
            return False
        raw = self._predict_call(kind, batch, tokens, context) / self.scale[kind]
        log_ratio = min(max(math.log(seconds / raw), -_MAX_LOG_RATIO), _MAX_LOG_RATIO)
        self._log_scale[kind] += self.correction_weight * (log_ratio - self._log_scale[kind])
        estimate = math.exp(self._log_scale[kind])
        if abs(estimate / self.scale[kind] - 1.0) > self.correction_tolerance:
            self.scale[kind] = estimate
            return True
        return False

    def heldout_error(self, samples: Iterable[Sample]) -> float:
        """Mean relative error |predicted - observed| / observed over `samples`."""
        errors = [abs(self._predict(s) - s.seconds) / s.seconds for s in samples if s.seconds > 0]
        if not errors:
            raise ValueError("no samples with positive seconds to score")
        return float(np.mean(errors))

    # -- on-disk cache -----------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fitted laws and what serving taught them (scale, step overhead)."""
        return {"format": 2, "verify_features": list(VERIFY_FEATURES),
                "draft_features": list(DRAFT_FEATURES),
                "verify_coef": list(self.verify_coef) if self.verify_coef else None,
                "draft_coef": list(self.draft_coef) if self.draft_coef else None,
                "scale": dict(self.scale), "step_overhead": self.step_overhead}

    @classmethod
    def from_dict(cls, data: Mapping) -> "CostModel":
        if data.get("format") != 2 or list(data.get("verify_features", ())) != list(VERIFY_FEATURES) \
                or list(data.get("draft_features", ())) != list(DRAFT_FEATURES):
            raise ValueError("cost model cache has an unknown format; re-profile")
        model = cls(data.get("verify_coef"), data.get("draft_coef"))
        for kind, value in dict(data.get("scale", {})).items():
            if kind in model.scale and value > 0:
                model.scale[kind] = float(value)
                model._log_scale[kind] = math.log(value)
        overhead = float(data.get("step_overhead", 0.0))
        model.step_overhead = overhead if math.isfinite(overhead) and overhead >= 0 else 0.0
        return model

    @staticmethod
    def key(model_name: str, dtype: str, device: str, versions: Mapping[str, str] | str) -> str:
        """Cache key (safe as a file name): readable prefix plus a digest of everything.

        `versions` should name what changes kernel timings (torch, transformers, CUDA,
        driver); any change in any argument gives a new key, so a stale profile is
        never reused.
        """
        versions = dict(sorted(versions.items())) if isinstance(versions, Mapping) else str(versions)
        payload = json.dumps([model_name, str(dtype), str(device), versions], sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model_name}-{dtype}-{device}")[-80:]
        return f"{readable}-{digest}"


def _levels(maximum: int) -> list[int]:
    """1, 2, 4, ... up to and including `maximum`: log spacing bounds the profile time."""
    levels, value = [], 1
    while value < maximum:
        levels.append(value)
        value *= 2
    return levels + [maximum]


def profile_grid(max_batch: int, max_tokens: int, contexts: Sequence[float],
                 kind: str = "verify") -> list[tuple[int, int, float]]:
    """The bounded set of (batch, tokens, context) shapes a worker times at start-up.

    `max_tokens` is the most tokens one request sends to verification (max k + 1).
    For kind="verify", tokens is the call's total, batch * per-request tokens with the
    per-request count in {1, 2, 3, 5, 9, ..., max_tokens}; for kind="draft", tokens is
    the number of draft steps in {1, 2, 4, ..., max_tokens - 1}. Batches are
    {1, 2, 4, ..., max_batch}. Size: O(log max_batch * log max_tokens * len(contexts)).
    """
    if max_batch < 1 or max_tokens < 1 or not contexts:
        raise ValueError("profile_grid needs max_batch >= 1, max_tokens >= 1 and a context")
    if kind == "verify":
        per_request = [1] + [k + 1 for k in _levels(max_tokens - 1)] if max_tokens > 1 else [1]
        return [(b, b * t, float(c)) for c in contexts for b in _levels(max_batch)
                for t in per_request]
    if kind == "draft":
        if max_tokens < 2:
            return []
        return [(b, k, float(c)) for c in contexts for b in _levels(max_batch)
                for k in _levels(max_tokens - 1)]
    raise ValueError(f"kind must be 'verify' or 'draft', got {kind!r}")
