"""StepRecorder: turns each step of the step loop into metrics (the engine's on_step hook).

`AsyncSpecEngine(on_step=recorder)` calls it after every applied step with the plan, the
workers' result, the step's seconds, the streamed deltas and the requests that were in
the batch. It only adds numbers into a `MetricsAggregator`; the cost-model prediction
(a few float operations) is the most it computes. No Ray, no I/O: testable in-process.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

from specserve_ray.metrics import DEFAULT_SLO_CLASS, MetricsAggregator
from specserve_ray.policy.cost_model import padded_tokens
from specserve_ray.policy.efficiency import expected_tokens
from specserve_ray.policy.slo import SloClass, attainment_record, request_latency


def slo_class_of(req) -> str:
    """The request's SLO class name, whichever way the engine carries it (tolerant: the
    SLO-class work adds `slo_class` / `slo` to requests; before that, "default")."""
    name = getattr(req, "slo_class", None)
    if not name:
        name = getattr(getattr(req, "slo", None), "name", None)
    return str(name) if name else DEFAULT_SLO_CLASS


def slo_budgets(req, registry=None) -> tuple[float, float]:
    """(TTFT, TPOT) budgets in seconds, the TTFT one at the request's prompt length; inf
    where the request's class sets none."""
    prompt_tokens = len(getattr(req, "prompt_ids", ()) or ())
    slo = getattr(req, "slo", None)
    if slo is not None and hasattr(slo, "ttft_budget") and hasattr(slo, "tpot_s"):
        return float(slo.ttft_budget(prompt_tokens)), float(slo.tpot_s)
    if registry is not None:
        try:
            cls = registry.get(getattr(req, "slo_class", None))
            return float(cls.ttft_budget(prompt_tokens)), float(cls.tpot_s)
        except (ValueError, KeyError):
            pass
    return math.inf, math.inf


class StepRecorder:
    def __init__(self, aggregator: MetricsAggregator | None = None, engine=None,
                 slo_registry=None):
        self.aggregator = aggregator or MetricsAggregator(time.monotonic())
        self.engine = engine               # for its cost model (adaptive policies only)
        self.slo_registry = slo_registry

    def __call__(self, plan, result, seconds: float, outputs, requests: Sequence) -> None:
        verify = result.verify
        chosen: Sequence[int] = ()
        drafted: Sequence[int] = ()
        accepted: Sequence[int] = ()
        emitted = 0
        predicted = expected = None
        if verify is not None and plan.decode_ids:
            chosen = plan.num_draft
            accepted = verify.num_accepted
            proposal = result.proposal
            # What the target actually verified: an in-draft early stop or the verifier's
            # trim may send fewer than planned, and a failed draft sent nothing (the step
            # fell back to plain). Acceptance rates are over verified tokens.
            drafted = (proposal.num_draft_tokens.tolist() if proposal is not None
                       else [0] * len(chosen))
            emitted = sum(len(e) for e in verify.emitted)
            cost = getattr(self.engine, "cost_model", None)
            if cost is not None and not plan.prefill and requests:
                predicted, expected = self._predict(cost, requests, drafted, emitted, proposal)
        self.aggregator.observe_step(seconds, len(plan.prefill), chosen, drafted, accepted,
                                     emitted, predicted, expected)
        if any(out.finished for out in outputs):
            self._finished(requests)

    def _predict(self, cost, requests, drafted, emitted, proposal):
        """Predicted step seconds and expected tokens for a decode-only step, as the
        policy saw it (context lengths before this step's tokens were committed)."""
        batch = len(drafted)
        # The longest context before this step's tokens were committed (what the padded
        # forwards attended over), approximately: the mean tokens emitted per row off.
        context = max(max(r.context_len for r in requests) - emitted / max(batch, 1), 0.0)
        seconds = float(cost.predict_verify(batch, padded_tokens(drafted), context))
        deepest = max(drafted, default=0)
        if deepest > 0 and cost.has_draft:
            active = [sum(1 for k in drafted if k > j) for j in range(deepest)]
            seconds += cost.predict_draft_ragged(active, context)
        tokens = None
        if proposal is not None and proposal.draft_confidence.shape[1] >= deepest:
            tokens = expected_tokens(proposal.draft_confidence, drafted)
        elif deepest == 0:
            tokens = float(batch)
        return seconds, tokens

    def _finished(self, requests: Sequence) -> None:
        now = time.monotonic()
        for req in requests:
            if not req.finished:
                continue
            ttft, tpot = request_latency(req.arrival_time, req.first_token_time, now,
                                         len(req.output_ids))
            name = slo_class_of(req)
            ttft_budget, tpot_budget = slo_budgets(req, self.slo_registry)
            record = None
            if math.isfinite(ttft_budget) or math.isfinite(tpot_budget):
                record = attainment_record(SloClass(name, ttft_budget, tpot_budget), ttft, tpot)
            self.aggregator.observe_finished(name, ttft, tpot, record)
