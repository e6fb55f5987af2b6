"""Load-adaptive speculation policy: pure numbers in, decisions out (no Ray, no I/O).

    cost_model   CostModel: profiled + regressed + online-corrected step times
    efficiency   expected tokens N and efficiency E = N / T
    drafter      SpecServe 5.1: pre-check and per-step early stop
    verifier     SpecServe 5.2: confidence-prior trim of what gets verified
    slo          SLO classes, admission order, attainment tracking
    policies     the SpeculationPolicy interface and its five implementations
"""
from __future__ import annotations

from specserve_ray.policy.cost_model import CostModel, Sample, profile_grid
from specserve_ray.policy.drafter import DraftProgress, precheck, record_step, should_continue, start_drafting
from specserve_ray.policy.efficiency import efficiency, expected_tokens, expected_tokens_uniform
from specserve_ray.policy.policies import (BatchState, ConfidenceThreshold, Decision, NoSpeculation,
                                           SmartSpec, SpecServe, SpeculationPolicy, StaticK,
                                           StepFeedback, update_confidence_ema)
from specserve_ray.policy.slo import SloClass, SloRegistry, SloTracker, admission_order, tightest_tpot
from specserve_ray.policy.verifier import brute_force_verify, select_verify

__all__ = ["make_policy", "CostModel", "Sample", "profile_grid", "DraftProgress", "precheck",
           "record_step", "should_continue", "start_drafting", "efficiency", "expected_tokens",
           "expected_tokens_uniform", "BatchState", "ConfidenceThreshold", "Decision",
           "NoSpeculation", "SmartSpec", "SpecServe", "SpeculationPolicy", "StaticK",
           "StepFeedback", "update_confidence_ema", "SloClass", "SloRegistry", "SloTracker",
           "admission_order", "tightest_tpot", "brute_force_verify", "select_verify"]

_SPECS = '"none", "static:K", "threshold", "threshold:T", "smartspec" or "specserve"'


def make_policy(spec: str, cost_model: CostModel | None = None, *, max_k: int = 8) -> SpeculationPolicy:
    """Build a policy from its config string; see _SPECS for the accepted forms."""
    if not isinstance(spec, str):
        raise ValueError(f"policy spec must be a string like {_SPECS}, got {spec!r}")
    name, _, arg = spec.strip().lower().partition(":")
    if name == "none" and not arg:
        return NoSpeculation()
    if name == "static":
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"'static' needs an integer k, as in 'static:4' (got {spec!r})") from None
        if not 0 <= k <= 16:
            raise ValueError(f"static k must be in [0, 16], got {k}")
        return StaticK(k)
    if name == "threshold":
        try:
            threshold = float(arg) if arg else 0.4
        except ValueError:
            raise ValueError(f"'threshold:T' needs a number in (0, 1] (got {spec!r})") from None
        return ConfidenceThreshold(threshold, max_k=max_k)
    if name in ("smartspec", "specserve") and not arg:
        if cost_model is None:
            raise ValueError(f"policy {name!r} needs a cost model")
        return (SmartSpec if name == "smartspec" else SpecServe)(cost_model, max_k=max_k)
    raise ValueError(f"unknown speculation policy {spec!r}; expected {_SPECS}")
