"""Load-adaptive speculation policy: pure numbers in, decisions out (no Ray, no I/O).

    spec         PolicySpec: the policy string, parsed once
    contracts    the SpeculationPolicy interface, BatchState, Decision, StepFeedback
    baselines    none, static k, confidence threshold, SmartSpec
    specserve    SpecServe: goodput-maximizing caps under the SLO, with exploration
    learned      LearnedState: acceptance per depth and drafter, calibration, observed
                 goodput per (batch, k); outlives policy switches, saved with the profile
    control      DraftControl: the in-loop stop/trim rules (the only implementation)
    cost_model   CostModel: profiled + regressed + online-corrected step times
    efficiency   expected tokens N and efficiency E = N / T
    drafter      SpecServe 5.1: per-step early stop
    verifier     SpecServe 5.2: confidence-prior trim of what gets verified
    slo          SLO classes, admission order, attainment records
"""
from __future__ import annotations

from specserve_ray.policy.baselines import ConfidenceThreshold, NoSpeculation, SmartSpec, StaticK
from specserve_ray.policy.contracts import (BatchState, Decision, SpeculationPolicy, StepFeedback,
                                            update_confidence_ema)
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy.cost_model import CostModel, Sample, padded_tokens, profile_grid
from specserve_ray.policy.drafter import DraftProgress, record_step, start_drafting
from specserve_ray.policy.efficiency import efficiency, expected_tokens, expected_tokens_uniform
from specserve_ray.policy.learned import LearnedState
from specserve_ray.policy.slo import SloClass, SloRegistry, SloTracker, admission_order, tightest_tpot
from specserve_ray.policy.spec import PolicySpec, parse_policy
from specserve_ray.policy.specserve import SpecServe
from specserve_ray.policy.verifier import brute_force_verify, select_verify

__all__ = ["make_policy", "PolicySpec", "parse_policy", "CostModel", "Sample", "padded_tokens",
           "profile_grid", "DraftProgress", "record_step", "start_drafting", "efficiency",
           "expected_tokens", "expected_tokens_uniform", "BatchState", "ConfidenceThreshold",
           "Decision", "DraftControl", "NoSpeculation", "SmartSpec", "SpecServe",
           "SpeculationPolicy", "StaticK", "StepFeedback", "update_confidence_ema",
           "LearnedState", "SloClass", "SloRegistry", "SloTracker", "admission_order",
           "tightest_tpot", "brute_force_verify", "select_verify"]


def make_policy(spec: PolicySpec | str, cost_model: CostModel | None = None, *, max_k: int = 8,
                learned: LearnedState | None = None) -> SpeculationPolicy:
    """Build a policy from its spec (or string). `max_k` is the most an adaptive policy
    drafts and the k of a bare "static"; `learned` is the engine's learned state, shared
    by every policy the engine runs (a fresh one if None)."""
    spec = parse_policy(spec)
    if spec.needs_cost_model and cost_model is None:
        raise ValueError(f"policy {spec.name!r} needs a cost model")
    if spec.name == "none":
        return NoSpeculation(learned=learned)
    if spec.name == "static":
        return StaticK(spec.static_k(max_k), learned=learned)
    if spec.name == "threshold":
        return ConfidenceThreshold(spec.threshold, max_k=max_k, learned=learned)
    if spec.name == "smartspec":
        return SmartSpec(cost_model, max_k=max_k, learned=learned)
    return SpecServe(cost_model, max_k=max_k, learned=learned)
