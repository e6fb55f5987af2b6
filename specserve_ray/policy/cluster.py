"""Cluster-wide speculation bounds: every router's signals in, one set of bounds out.

Routers report windowed signals (`RouterSignals`, one per report interval); the
controller sums them (`ClusterSignals.aggregate`) and asks `ClusterBounds.update` for the
bounds every router then applies on top of its own policy (`RuntimeBounds`: speculation
on/off, max k, verification budget). Bounds only ever *cap* k, so output stays exactly
the target's (lossless); they decide how much speculative work the cluster may spend.

The rule (why each part):

- A router whose mean step time exceeds its tightest TPOT budget, SLO attainment under
  target, or requests queued while every batch slot is busy are *pressure*. SpecServe's SLO constraint is
  T(k) <= TPOT (DESIGN.md), so a step slower than the budget is the first thing to cut,
  and speculation lengthens every step. A full batch with a queue means throughput, not
  per-request latency, is scarce; verifying k + 1 tokens per request is where fixed
  speculation hurts at high load (the target turns compute-bound). Under pressure the
  cap on k halves (multiplicative decrease: from 8 to off in four reports).
- Calm (no queue, batch under `low_utilization`, steps comfortably inside the budget,
  SLOs met) for `raise_after` consecutive reports raises the cap by one (additive
  increase). The band between `low_utilization` and `high_utilization` and the dwell
  time are the hysteresis: load near one threshold cannot make the cap flap.
- The cap never exceeds the depth at which a drafted token's survival a^k falls under
  `min_survival`, with a the cluster-wide first-position acceptance (tokens that deep
  are almost always rejected). It never goes below 1 for this reason: acceptance is
  only measured while drafting, and per-request policies already stop hopeless drafts.
- With `verify_knee_tokens` set (tokens one target forward scores before it turns
  compute-bound; a hardware property), each step may verify at most knee - B draft
  tokens, B the largest running batch of any router: past the knee every extra token
  costs its full compute. Budget 0 switches speculation off until batches shrink.

Everything here is pure: numbers in, bounds out (no Ray, asyncio or I/O).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from specserve_ray.contracts import RuntimeBounds

__all__ = ["RouterSignals", "ClusterSignals", "ClusterBoundsConfig", "ClusterBounds",
           "bound_ks", "bounds_to_dict", "bounds_from_dict"]


@dataclass(frozen=True)
class RouterSignals:
    """One router's report: counts over the last `window_s` seconds plus its load now."""

    router_id: str
    window_s: float
    arrivals: int = 0              # requests that arrived in the window
    finished: int = 0
    queue_depth: int = 0           # requests waiting for a batch slot now
    running: int = 0               # requests in the batch now
    capacity: int = 1              # batch slots (max_num_seqs)
    decode_steps: int = 0
    decode_rows: int = 0
    decode_seconds: float = 0.0    # summed wall time of decode steps
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_first_pos: int = 0    # drafts whose first token was accepted
    max_k: int = 0                 # the router's own ceiling (num_speculative_tokens)
    tightest_tpot_s: float = math.inf   # smallest TPOT budget among running requests
    slo_requests: int = 0          # finished requests with an SLO, in the window
    slo_attained: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tightest_tpot_s"] = None if math.isinf(self.tightest_tpot_s) else self.tightest_tpot_s
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RouterSignals":
        data = dict(data)
        if data.get("tightest_tpot_s") is None:
            data["tightest_tpot_s"] = math.inf
        return cls(**data)


@dataclass(frozen=True)
class ClusterSignals:
    """The sum over routers, and the ratios the rule reads."""

    routers: int = 0
    arrival_rate: float = 0.0      # requests per second, all routers
    queue_depth: int = 0
    running: int = 0
    capacity: int = 0
    max_running: int = 0           # the largest batch of any one router
    decode_steps: int = 0
    decode_seconds: float = 0.0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_first_pos: int = 0
    max_k: int = 0
    tightest_tpot_s: float = math.inf
    step_over_tpot: float = 0.0    # worst router's mean step / its tightest TPOT (0: none)
    slo_requests: int = 0
    slo_attained: int = 0

    @classmethod
    def aggregate(cls, reports: Iterable[RouterSignals]) -> "ClusterSignals":
        reports = list(reports)
        if not reports:
            return cls()
        return cls(
            routers=len(reports),
            arrival_rate=sum(r.arrivals / r.window_s for r in reports if r.window_s > 0),
            queue_depth=sum(r.queue_depth for r in reports),
            running=sum(r.running for r in reports),
            capacity=sum(r.capacity for r in reports),
            max_running=max(r.running for r in reports),
            decode_steps=sum(r.decode_steps for r in reports),
            decode_seconds=sum(r.decode_seconds for r in reports),
            num_drafts=sum(r.num_drafts for r in reports),
            num_draft_tokens=sum(r.num_draft_tokens for r in reports),
            num_accepted_tokens=sum(r.num_accepted_tokens for r in reports),
            accepted_first_pos=sum(r.accepted_first_pos for r in reports),
            max_k=max(r.max_k for r in reports),
            tightest_tpot_s=min(r.tightest_tpot_s for r in reports),
            # Per router: a tight-SLO request is slowed by its own router's steps, which
            # a cluster-wide mean step time would dilute with other routers' fast ones.
            step_over_tpot=max(r.decode_seconds / r.decode_steps / r.tightest_tpot_s
                               if r.decode_steps and math.isfinite(r.tightest_tpot_s) else 0.0
                               for r in reports),
            slo_requests=sum(r.slo_requests for r in reports),
            slo_attained=sum(r.slo_attained for r in reports))

    @property
    def utilization(self) -> float:
        return self.running / self.capacity if self.capacity else 0.0

    @property
    def mean_step_s(self) -> float | None:
        return self.decode_seconds / self.decode_steps if self.decode_steps else None

    @property
    def attainment(self) -> float | None:
        return self.slo_attained / self.slo_requests if self.slo_requests else None

    @property
    def first_pos_acceptance(self) -> float | None:
        return self.accepted_first_pos / self.num_drafts if self.num_drafts else None


@dataclass(frozen=True)
class ClusterBoundsConfig:
    high_utilization: float = 0.9    # batch slots busy (with a queue) = pressure
    low_utilization: float = 0.5     # at or under this (and no queue) = calm
    tpot_margin: float = 0.8         # calm needs step time <= margin * tightest TPOT
    attainment_target: float = 0.9   # SLO attainment under this = pressure
    min_slo_requests: int = 5        # finished SLO requests before attainment counts
    raise_after: int = 3             # consecutive calm updates before the cap rises
    min_survival: float = 0.05       # deepest useful draft token: a^k >= this
    min_drafts: int = 32             # drafts observed before acceptance caps k
    verify_knee_tokens: int | None = None   # tokens per target forward before compute-bound

    def __post_init__(self):
        if not 0 <= self.low_utilization < self.high_utilization <= 1:
            raise ValueError("need 0 <= low_utilization < high_utilization <= 1")
        if self.raise_after < 1 or not 0 < self.tpot_margin <= 1:
            raise ValueError("raise_after must be >= 1 and tpot_margin in (0, 1]")
        if not 0 < self.min_survival < 1:
            raise ValueError("min_survival must be in (0, 1)")
        if self.verify_knee_tokens is not None and self.verify_knee_tokens < 1:
            raise ValueError("verify_knee_tokens must be >= 1 (or None)")


@dataclass
class ClusterBounds:
    """The stateful rule (module doc): `update(signals) -> bool  # True if bounds changed`."""

    config: ClusterBoundsConfig = field(default_factory=ClusterBoundsConfig)
    level: int | None = None       # the cap on k; None until the first report sets it
    calm_updates: int = 0
    bounds: RuntimeBounds = field(default_factory=RuntimeBounds)
    reason: str = "no reports yet"

    def update(self, signals: ClusterSignals) -> bool:
        cfg, ceiling = self.config, signals.max_k
        if signals.routers == 0:
            return False                      # nothing known: keep what routers have
        if self.level is None or self.level > ceiling:
            self.level = ceiling
        pressure = self._pressure(signals)
        if pressure:
            self.level //= 2
            self.calm_updates = 0
            self.reason = pressure
        elif self._calm(signals):
            self.calm_updates += 1
            if self.calm_updates >= cfg.raise_after and self.level < ceiling:
                self.level += 1
                self.calm_updates = 0
            self.reason = "calm"
        else:
            self.calm_updates = 0
            self.reason = "hold"
        previous, self.bounds = self.bounds, self._bounds(signals, ceiling)
        return self.bounds != previous

    def _pressure(self, s: ClusterSignals) -> str:
        cfg = self.config
        if s.step_over_tpot > 1.0:
            return f"steps {s.step_over_tpot:.2f}x the tightest TPOT budget"
        if (s.attainment is not None and s.slo_requests >= cfg.min_slo_requests
                and s.attainment < cfg.attainment_target):
            return f"SLO attainment {s.attainment:.2f} < {cfg.attainment_target}"
        if s.queue_depth > 0 and s.utilization >= cfg.high_utilization:
            return f"{s.queue_depth} queued with {s.utilization:.0%} of batch slots busy"
        return ""

    def _calm(self, s: ClusterSignals) -> bool:
        cfg = self.config
        if s.queue_depth > 0 or s.utilization > cfg.low_utilization:
            return False
        if s.step_over_tpot > cfg.tpot_margin:
            return False
        return s.attainment is None or s.attainment >= cfg.attainment_target

    def _bounds(self, s: ClusterSignals, ceiling: int) -> RuntimeBounds:
        cfg = self.config
        max_k = self.level
        a = s.first_pos_acceptance
        if a is not None and s.num_drafts >= cfg.min_drafts and max_k > 1:
            max_k = min(max_k, useful_depth(a, cfg.min_survival, ceiling))
        budget = None
        if cfg.verify_knee_tokens is not None:
            budget = max(cfg.verify_knee_tokens - s.max_running, 0)
        enabled = max_k > 0 and budget != 0
        return RuntimeBounds(enabled, None if max_k >= ceiling else max_k, budget)


def useful_depth(acceptance: float, min_survival: float, ceiling: int) -> int:
    """Deepest k (1..ceiling) whose token still survives with probability >= min_survival
    under a uniform per-token acceptance a: a^k >= min_survival."""
    if acceptance >= 1.0:
        return ceiling
    if acceptance <= 0.0:
        return 1
    return int(min(max(math.floor(math.log(min_survival) / math.log(acceptance)), 1), ceiling))


def bound_ks(ks: Sequence[int], bounds: RuntimeBounds) -> list[int]:
    """Cap each row's k by the bounds, then fit the batch into the verification budget
    by lowering the deepest rows first (their last tokens are the least likely to be
    accepted: survival falls with depth). Only ever lowers k: lossless."""
    if not bounds.speculation_enabled:
        return [0] * len(ks)
    out = [min(k, bounds.max_k) for k in ks] if bounds.max_k is not None else list(ks)
    budget = bounds.verify_budget
    if budget is not None and sum(out) > budget:
        # Water-fill from the top: the largest level L with sum(min(k, L)) <= budget, then
        # hand what is left of the budget out one token at a time to rows deeper than L.
        level = max(out)
        while level > 0 and sum(min(k, level) for k in out) > budget:
            level -= 1
        spare = budget - sum(min(k, level) for k in out)
        capped = []
        for k in out:
            extra = 1 if k > level and spare > 0 else 0
            spare -= extra
            capped.append(min(k, level) + extra)
        out = capped
    return out


def bounds_to_dict(bounds: RuntimeBounds) -> dict:
    return {"speculation_enabled": bounds.speculation_enabled, "max_k": bounds.max_k,
            "verify_budget": bounds.verify_budget}


def bounds_from_dict(data: dict) -> RuntimeBounds:
    bounds = RuntimeBounds(bool(data.get("speculation_enabled", True)), data.get("max_k"),
                           data.get("verify_budget"))
    if (bounds.max_k is not None and bounds.max_k < 0) or \
            (bounds.verify_budget is not None and bounds.verify_budget < 0):
        raise ValueError(f"bounds must be non-negative, got {data}")
    return bounds
