"""SpeculationChooser: what each decode row speculates this step, and what the policy learns.

    plan_step ──choose──> k per row (policy or static k, every cap in `_final_ks`),
                          n-gram drafts, the in-draft-loop control
              ──track──>  the plan's decision and n-gram rows, kept until it is applied
    apply_step ─take_ngram_rows / observe_step──> n-gram and policy feedback

The scheduler owns one and calls it from plan_step / apply_step / forget_plan; it knows
requests' drafters, caps and the speculation policy, not the token budget or the queue
order. It reads the scheduler's live `limits` and waiting queue (both may be swapped
between steps).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence

from specserve_ray.config import SpeculationConfig
from specserve_ray.contracts import NO_BOUNDS, RuntimeBounds, StepPlan, StepResult
from specserve_ray.drafting.planner import NgramPlanner
from specserve_ray.policy import BatchState, CostModel, Decision, SpeculationPolicy, make_policy
from specserve_ray.policy.cluster import bound_ks
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy.learned import LearnedState
from specserve_ray.policy.prefill_share import prefill_need, share_caps, spare_for_speculation
from specserve_ray.request import Request
from specserve_ray.stats import count_values

if TYPE_CHECKING:
    from specserve_ray.scheduler import Scheduler

KChooser = Callable[[Sequence[Request]], list[int]]


class SpeculationChooser:
    def __init__(self, scheduler: "Scheduler", has_draft: bool,
                 speculation: SpeculationConfig | None = None,
                 k_chooser: KChooser | None = None, cost_model: CostModel | None = None):
        self._scheduler = scheduler     # read for its live limits and waiting queue
        self.has_draft = has_draft
        # What serving teaches the policies (acceptance, calibration, measured goodput),
        # whichever policy runs; it outlives policy switches and is saved with the profile.
        self.learned = LearnedState(cost_model)
        self.cost_model = cost_model
        # Called every `persist_every` decode steps to save `learned` (an I/O shell sets
        # it: policy.profile.attach_persistence saves next to the cached profile).
        self.persist_learned: Callable[[], None] | None = None
        self.persist_every = 512
        self._decode_steps = 0
        self.policy: SpeculationPolicy | None = None
        self._decided_by: SpeculationPolicy | None = None   # the policy planning this step
        self._decision: Decision | None = None               # and what it decided
        # id(plan) -> (policy that decided it, its decision) until the plan is applied.
        self._in_flight: dict[int, tuple[SpeculationPolicy, Decision]] = {}
        self._control: DraftControl | None = None           # its in-draft-loop rules
        self.chosen_k_sum = 0       # k chosen per decode row, since the policy last changed
        self.chosen_k_rows = 0
        # Rows per chosen k, cumulative since start (never reset; clients diff snapshots).
        self.chosen_k_counts: list[int] = []
        self.bounds = RuntimeBounds()   # cluster controller's caps; kept across policy switches
        self.speculation = speculation or SpeculationConfig()
        self.k_chooser = k_chooser or self._choose_k
        # Whether any SLO class has a TPOT budget (the scheduler sets it with its classes):
        # without one the policy sees no budgets or slack.
        self.tpot_budgets = False
        # Likewise TTFT budgets: without one, waiting prompts never take budget from drafts.
        self.ttft_budgets = False
        self.ngram = NgramPlanner()     # prompt lookup and its acceptance estimates
        # id(plan) -> per decode row: n-gram match length, or None (not an n-gram row).
        self._ngram_rows: dict[int, list[int | None]] = {}
        self._match_lens: list[int | None] | None = None    # this step's, until tracked
        self.step_s_ema = 0.0           # recent decode steps' seconds (prefill share)
        # This step's token budget (the scheduler sets it before `choose`); None = the
        # configured one.
        self.step_budget: int | None = None
        self.prefill_capped_steps = 0   # steps whose k caps the waiting prompts lowered

    # -- knobs --------------------------------------------------------------------------------
    @property
    def cost_model(self) -> CostModel | None:
        return self._cost_model

    @cost_model.setter
    def cost_model(self, cost: CostModel | None) -> None:
        self._cost_model = cost
        self.learned.cost = cost

    @property
    def speculation(self) -> SpeculationConfig:
        return self._speculation

    @speculation.setter
    def speculation(self, spec: SpeculationConfig) -> None:
        """Switch speculation (policy included) between steps; the old one stays on error."""
        policy = None
        if spec.static_k is None:
            if spec.needs_cost_model and self.cost_model is None:
                raise ValueError(f"policy {spec.policy!r} needs a cost model; profile the "
                                 "workers first (SpecEngine.from_config does)")
            policy = make_policy(spec.spec, self.cost_model, max_k=spec.num_speculative_tokens,
                                 learned=self.learned)
        self._speculation, self.policy = spec, policy
        self.chosen_k_sum = self.chosen_k_rows = 0

    def apply_bounds(self, bounds: RuntimeBounds) -> None:
        """Cap speculation from outside (cluster controller), for every policy, static
        included; the caps survive policy switches. They only ever lower k (lossless)
        and apply in `_final_ks`, like every other cap."""
        self.bounds = bounds

    @property
    def mean_chosen_k(self) -> float:
        """Mean k per decode row (after clamping) since the policy last changed."""
        return self.chosen_k_sum / self.chosen_k_rows if self.chosen_k_rows else 0.0

    # -- plan ---------------------------------------------------------------------------------
    def choose(self, batch: Sequence[Request]) -> tuple[
            list[int], list[list[int] | None] | None, list[list[float] | None] | None,
            DraftControl | None]:
        """Each decode row's k (every cap applied), the n-gram rows' drafts and their
        confidences (None = no fixed drafts) and the in-draft-loop control (None = none)."""
        self._decided_by = self._control = self._decision = None
        ks = self._final_ks(batch, self.k_chooser(batch)) if batch else []
        fixed, fixed_conf, self._match_lens = self._ngram_drafts(batch, ks)
        if fixed is not None:
            ks = [len(f) if f is not None else k for f, k in zip(fixed, ks)]
        self.chosen_k_sum += sum(ks)
        self.chosen_k_rows += len(ks)
        count_values(self.chosen_k_counts, ks)
        control = self._control if any(ks) else None
        return ks, fixed, fixed_conf, control

    def track(self, plan: StepPlan) -> None:
        """Keep what `choose` decided for `plan` until it is applied or forgotten."""
        if plan.fixed_drafts is not None:
            self._ngram_rows[id(plan)] = self._match_lens
        if self._decided_by is not None:
            # Kept per plan: with pipelining another plan is decided before this one returns.
            self._in_flight[id(plan)] = (self._decided_by, self._decision)

    def forget(self, plan: StepPlan) -> None:
        """A plan that will never be applied (its execution failed)."""
        self._in_flight.pop(id(plan), None)
        self._ngram_rows.pop(id(plan), None)

    # -- drafters ----------------------------------------------------------------------------
    def drafter_of(self, req: Request) -> str:
        """The request's drafter this step: its own choice, else the configured one. With
        no draft model, 'model+ngram' is 'ngram' and 'model' drafts nothing."""
        drafter = req.params.drafter or self.speculation.drafter
        if not self.has_draft and drafter == "model+ngram":
            return "ngram"
        return drafter

    def batch_drafter(self, batch: Sequence[Request]) -> str:
        """The label the policy decides and learns under: the rows' drafter when they
        share one, else "model+ngram" (some rows may take the model's proposals)."""
        drafters = {self.drafter_of(r) for r in batch}
        return drafters.pop() if len(drafters) == 1 else "model+ngram"

    def _can_draft(self, req: Request) -> bool:
        return self.has_draft or self.drafter_of(req) != "model"

    def _ngram_drafts(self, batch: Sequence[Request], ks: Sequence[int]):
        """The n-gram rows' drafts (drafting/planner.py), after every cap on k."""
        drafters = [self.drafter_of(r) for r in batch]
        if all(d == "model" for d in drafters):
            return None, None, None
        spec, control = self.speculation, self._control
        threshold = control.threshold if control is not None and control.stop == "threshold" \
            else None
        histories = [r.token_history().view() if d != "model" else None
                     for r, d in zip(batch, drafters)]
        out = self.ngram.plan(histories, ks, drafters,
                              (spec.prompt_lookup_min, spec.prompt_lookup_max),
                              self.has_draft, threshold)
        return out.drafts, out.confidence, out.match_lengths

    # -- k: one home for every cap ------------------------------------------------------------
    def _static_k(self, requests: Sequence[Request]) -> list[int]:
        return [self.speculation.static_k] * len(requests)

    def _choose_k(self, requests: Sequence[Request]) -> list[int]:
        """The default k_chooser: the static k, or the policy's per-request caps."""
        policy = self.policy
        if policy is None:
            return self._static_k(requests)
        budgets = slack = None
        now = time.monotonic()
        if self.tpot_budgets:
            budgets = [r.slo.tpot_s for r in requests]
            slack = [r.tpot_slack(now) for r in requests]
        caps = self._final_ks(requests, [policy.max_k] * len(requests))
        if policy.shares_budget_with_prefill and self.speculation.yield_to_prompts:
            caps = self._prefill_share(requests, caps, slack, now)
        state = BatchState(
            context_len=[r.context_len for r in requests],
            k_cap=caps,
            confidence_ema=[r.confidence_ema for r in requests],
            tpot_budget_s=budgets, tpot_slack_s=slack,
            queue_depth=len(self._scheduler.waiting),
            drafter=self.batch_drafter(requests))
        decision = policy.decide(state)
        self._decided_by, self._decision = policy, decision
        self._control = decision.control
        return list(decision.max_k)

    def _prefill_share(self, requests: Sequence[Request], caps: list[int],
                       tpot_slack: list[float] | None, now: float) -> list[int]:
        """Lower the caps so the drafted tokens leave waiting prompts the part of the
        step's budget their TTFT budgets need (policy/prefill_share.py); rows behind
        their TPOT budget keep their caps."""
        budget = self.step_budget or self._scheduler.limits.max_num_batched_tokens
        if budget is None or not self.ttft_budgets or not any(caps):
            return caps
        need = prefill_need(self._scheduler.pending_prompts(now), self.step_s_ema)
        spare = spare_for_speculation(budget, len(requests), need)
        if spare is None:
            return caps
        exempt = ([s < 0 for s in tpot_slack] if tpot_slack is not None
                  else [False] * len(caps))
        shared = share_caps(caps, spare, exempt)
        if shared != caps:
            self.prefill_capped_steps += 1
        return shared

    def _final_ks(self, batch: Sequence[Request], chosen: Sequence[int]) -> list[int]:
        """Every cap on k, in one place: the request's own k, what is left of max_tokens
        and the context (the final token is always the target's), then the cluster bounds."""
        max_model_len = self._scheduler.limits.max_model_len
        ks = []
        for req, k in zip(batch, chosen):
            if not self._can_draft(req):
                k = 0
            if req.num_speculative_tokens is not None:
                k = min(k, req.num_speculative_tokens)
            left = req.params.max_tokens - len(req.output_ids) - 1
            room = max_model_len - req.context_len - 1
            ks.append(max(0, min(k, left, room)))
        return bound_ks(ks, self.bounds) if self.bounds != NO_BOUNDS else ks

    # -- apply --------------------------------------------------------------------------------
    def take_ngram_rows(self, plan: StepPlan) -> list[int | None] | None:
        """Per decode row of `plan`: its n-gram match length, or None (not an n-gram row);
        None when the plan had no n-gram rows."""
        return self._ngram_rows.pop(id(plan), None)

    def observe_step(self, plan: StepPlan, result: StepResult, by_id: dict, seconds: float
                     ) -> None:
        """A verified step: feed it to the policy that decided it, if that one still runs."""
        self.step_s_ema = seconds if self.step_s_ema <= 0 else \
            0.8 * self.step_s_ema + 0.2 * seconds
        decided = self._in_flight.pop(id(plan), None)
        if decided is not None and decided[0] is self.policy:
            self._feed_policy(plan, result, by_id, seconds, decided[1])

    def _feed_policy(self, plan: StepPlan, result: StepResult, by_id: dict, seconds: float,
                     decision: Decision) -> None:
        """Hand the step to the policy; it returns each row's updated confidence."""
        confidence = [by_id[rid].confidence_ema if rid in by_id else None
                      for rid in plan.decode_ids]
        updated = self.policy.observe_step(plan, result, seconds, decision, confidence)
        for rid, value in zip(plan.decode_ids, updated):
            if rid in by_id:
                by_id[rid].confidence_ema = value
        self._decode_steps += 1
        if self.persist_learned is not None and self._decode_steps % self.persist_every == 0:
            self.persist_learned()
