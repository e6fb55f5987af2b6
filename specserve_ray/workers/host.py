"""One step's work on each side, as functions of a plan (messages: specserve_ray.contracts).

The step loop (engine or Ray router) builds a `StepPlan`; the draft side runs its part
and hands the plan on with its proposal; the target side finishes the step. The same
two calls run in-process, over plain Ray actor calls, or as a Ray compiled graph
(draft -> target), so every transport shares this code.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from specserve_ray.contracts import DraftOutput, StepPlan, StepResult
from specserve_ray.drafting.fixed import fixed_proposal, merge_fixed, model_caps, with_point_mass
from specserve_ray.workers.draft import DraftWorker
from specserve_ray.workers.target import TargetWorker


def run_draft(worker: DraftWorker | None, plan: StepPlan) -> DraftOutput:
    fixed = plan.fixed_drafts
    if worker is None:
        # No draft model: only the scheduler's fixed (n-gram) drafts, if any.
        if fixed is None or not plan.decode_ids:
            return DraftOutput(plan, None)
        return DraftOutput(plan, fixed_proposal(fixed, plan.fixed_confidence))
    worker.release(plan.release)
    start = time.perf_counter()
    if plan.prefill:
        worker.prefill(plan.prefill)
    prefill_s = time.perf_counter() - start
    proposal = None
    if plan.decode_ids:
        # Rows with fixed drafts only sync (the model sees their tokens lazily).
        proposal = worker.propose(plan.decode_ids, plan.new_tokens,
                                  model_caps(plan.num_draft, fixed), plan.draft_control)
        if fixed is not None:
            proposal = merge_fixed(proposal, fixed, plan.fixed_confidence)
    return DraftOutput(plan, proposal, prefill_seconds=prefill_s)


def _verify_args(worker: TargetWorker, plan: StepPlan, proposal):
    """(draft ids [B, K], counts [B], draft probs or None) for the plan's decode rows."""
    if proposal is None or proposal.draft_token_ids.shape[1] == 0:
        batch = len(plan.decode_ids)
        return torch.empty(batch, 0, dtype=torch.long), torch.zeros(batch, dtype=torch.long), None
    probs = proposal.draft_probs
    if proposal.fixed_rows is not None:
        probs = with_point_mass(proposal, worker.sampled(plan.decode_ids), worker.vocab_size)
    return proposal.draft_token_ids, proposal.num_draft_tokens, probs


def run_target(worker: TargetWorker, draft_out: DraftOutput) -> StepResult:
    plan = draft_out.plan
    worker.release(plan.release)
    verify, first, target_prefill_s = None, [], 0.0
    if plan.prefill and plan.decode_ids and getattr(worker.runner, "flat", False):
        # Prompt chunks ride in the verification's forward: one weight pass per step.
        first, verify, target_prefill_s = worker.prefill_and_verify(
            plan.prefill, plan.decode_ids, *_verify_args(worker, plan, draft_out.proposal))
    else:
        start = time.perf_counter()
        first = worker.prefill(plan.prefill) if plan.prefill else []
        target_prefill_s = time.perf_counter() - start
        if plan.decode_ids:
            verify = worker.verify(plan.decode_ids,
                                   *_verify_args(worker, plan, draft_out.proposal))
    prefill_s = draft_out.prefill_seconds + target_prefill_s
    proposal = draft_out.proposal
    if proposal is not None and proposal.draft_probs is not None:
        proposal = replace(proposal, draft_probs=None)  # the router needs only confidences
    return StepResult(first, verify, proposal, draft_out.draft_error, prefill_s)
