"""Scheduler: plans every step and applies its result; knows requests, not models.

    waiting ──admit──> prefilling ──last chunk scored──> decoding ──EOS/stop/length──> done

A step's plan, under a token budget (`limits.max_num_batched_tokens`, vLLM's name; a step
with no decode row may prefill up to `limits.max_prefill_tokens_idle`):
  1. decode rows first: every decoding request verifies its pending token + k_i drafts
     (k_i from the speculation policy, clamped in one place: `_final_ks`);
  2. then prefill chunks: partially prefilled prompts continue, then waiting requests are
     admitted (FIFO, or least TTFT slack first), each taking at most what is left of the
     budget, so a long arrival never stalls the running batch for more than one budget.
A request's first token is sampled when its last chunk is scored. Chunking is exact: the
KV cache holds the same keys whatever the chunk boundaries (greedy output identical).

The workers run the plan (in-process: `engine.SpecEngine`; Ray actors: the router).
"""
from __future__ import annotations

import itertools
import math
import time
from collections import deque
from typing import Callable, Sequence


from specserve_ray.config import LimitsConfig, SamplingParams, SloConfig, SpeculationConfig
from specserve_ray.drafting.planner import NgramPlanner
from specserve_ray.contracts import (NO_BOUNDS, PrefillItem, RuntimeBounds, StepPlan,
                                     StepResult)
from specserve_ray.errors import RequestError
from specserve_ray.output import commit_tokens
from specserve_ray.policy import BatchState, CostModel, Decision, SpeculationPolicy, make_policy
from specserve_ray.policy.cluster import bound_ks
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy.learned import LearnedState
from specserve_ray.policy.slo import (ClassAttainment, SloClass, SloRegistry, SloTracker,
                                      admission_order, request_latency)
from specserve_ray.request import Request, RequestOutput
from specserve_ray.stats import SpecStats, StepStats, StepTotals, count_values

KChooser = Callable[[Sequence[Request]], list[int]]


def _tpot_slack(req: Request, now: float) -> float:
    """Seconds a request is ahead (+) or behind (-) its TPOT budget so far."""
    if req.first_token_time is None or not math.isfinite(req.slo.tpot_s):
        return 0.0
    return req.slo.tpot_s * (len(req.output_ids) - 1) - (now - req.first_token_time)


class Scheduler:
    def __init__(self, tokenizer, vocab_size: int | None, has_draft: bool,
                 limits: LimitsConfig | None = None, speculation: SpeculationConfig | None = None,
                 k_chooser: KChooser | None = None, cost_model: CostModel | None = None,
                 slo: SloConfig | SloRegistry | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.has_draft = has_draft
        self.limits = limits or LimitsConfig()
        # What serving teaches the policies (acceptance, calibration, measured goodput),
        # whichever policy runs; it outlives policy switches and is saved with the profile.
        self.learned = LearnedState(cost_model)
        self.cost_model = cost_model
        # Called every `persist_every` decode steps to save `learned` (an I/O shell sets
        # it: SpecEngine.from_config saves next to the cached profile).
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
        self.eos_token_id = tokenizer.eos_token_id
        self.k_chooser = k_chooser or self._choose_k
        self.waiting: list[Request] = []
        self.running: list[Request] = []     # admitted: prefilling or decoding
        self._ids = itertools.count()
        # Releases travel with the next plan (one message per step); an in-process engine
        # with local workers releases at once instead (`release_eagerly`).
        self.release_eagerly = False
        self._to_release: list[str] = []
        self.recent_steps: deque[StepStats] = deque(maxlen=1024)   # for the cost model
        self.step_totals = StepTotals()
        self.totals = SpecStats()
        self.ngram = NgramPlanner()     # prompt lookup and its acceptance estimates
        # id(plan) -> per decode row: n-gram match length, or None (not an n-gram row).
        self._ngram_rows: dict[int, list[int | None]] = {}
        self.slo = slo or SloConfig()
        self.slo_tracker = SloTracker()    # attainment of finished requests, per class name

    # -- knobs --------------------------------------------------------------------------------
    @property
    def cost_model(self) -> CostModel | None:
        return self._cost_model

    @cost_model.setter
    def cost_model(self, cost: CostModel | None) -> None:
        self._cost_model = cost
        self.learned.cost = cost

    @property
    def slo(self) -> SloRegistry:
        return self._slo

    @slo.setter
    def slo(self, slo: SloConfig | SloRegistry) -> None:
        """Swap the SLO classes between steps (new requests resolve against them)."""
        registry = slo if isinstance(slo, SloRegistry) else slo.registry()
        classes = registry.classes.values()
        # Decided here, not per step: without budgets admission stays FIFO and the
        # policy sees no SLO at all.
        self._slo_orders_admission = any(math.isfinite(c.ttft_s) for c in classes)
        self._slo_caps_steps = any(math.isfinite(c.tpot_s) for c in classes)
        self._slo = registry

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

    # -- requests -----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty", "prompt", "invalid_value")
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = list(prompt)
        vocab = self.vocab_size
        if any((type(t) is not int) or t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt",
                               "invalid_value")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None,
                    num_speculative_tokens: int | None = None,
                    slo_class: str | None = None) -> str:
        params = params or SamplingParams()
        slo = self.resolve_slo_class(slo_class)
        prompt_ids = self.encode(prompt)
        lim = self.limits
        if not prompt_ids:
            raise RequestError("prompt is empty", "prompt", "invalid_value")
        if len(prompt_ids) >= lim.max_model_len:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; the context holds "
                               f"{lim.max_model_len} including at least one output token",
                               "prompt", "context_length_exceeded")
        if params.max_tokens > lim.max_tokens:
            raise RequestError(f"max_tokens {params.max_tokens} exceeds the limit {lim.max_tokens}",
                               "max_tokens", "invalid_value")
        if len(prompt_ids) + params.max_tokens > lim.max_model_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context length {lim.max_model_len}", "max_tokens", "context_length_exceeded")
        if num_speculative_tokens is not None and (
                type(num_speculative_tokens) is not int or not 0 <= num_speculative_tokens <= 16):
            raise RequestError("num_speculative_tokens must be an integer in [0, 16]",
                               "num_speculative_tokens", "invalid_value")
        if params.drafter is not None and params.drafter == "model" and not self.has_draft:
            raise RequestError("drafter 'model' needs a draft model and this engine has none; "
                               "use 'ngram' or leave drafter unset", "drafter", "invalid_value")
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError(f"request_id must be a string, got {type(request_id).__name__}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if any(r.request_id == rid for r in itertools.chain(self.waiting, self.running)):
            raise RequestError(f"request id {rid!r} is already in use")
        self.waiting.append(Request(rid, prompt_ids, params, num_speculative_tokens, slo))
        return rid

    def resolve_slo_class(self, name: str | None) -> SloClass:
        """The class a request named (None = the default); RequestError if unknown."""
        if name is not None and not isinstance(name, str):
            raise RequestError(f"slo_class must be a string, got {type(name).__name__}",
                               "slo_class", "invalid_type")
        try:
            return self._slo.get(name)
        except ValueError as exc:
            raise RequestError(str(exc), "slo_class", "invalid_value") from None

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its caches on both workers."""
        for queue in (self.waiting, self.running):
            for r in queue:
                if r.request_id == request_id:
                    queue.remove(r)
                    if queue is self.running:
                        self._release([request_id])
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, ids: list[str]) -> None:
        self._to_release.extend(ids)
        if self.release_eagerly:
            self._release_now()

    def _release_now(self) -> None:
        """Free released caches on local workers at once (the in-process engine)."""

    def requeue_releases(self, ids: Sequence[str]) -> None:
        """Releases of a plan that never reached the workers travel again with the next."""
        self._to_release.extend(i for i in ids if i not in self._to_release)

    # -- plan ---------------------------------------------------------------------------------
    def plan_step(self, busy: frozenset[str] | set[str] = frozenset(),
                  max_rows: int | None = None) -> StepPlan | None:
        """Choose every decoding request's k, then fill the token budget with prefill.

        `busy` are requests in a step still in flight (draft/verify pipelining): they are
        left out, so a request is in at most one step at a time. `max_rows` caps the
        decode batch, to split the running requests into micro-batches.
        """
        release, self._to_release = self._to_release, []
        batch = [r for r in self.running
                 if r.prefill_done and not r.finished and r.request_id not in busy]
        if max_rows is not None:
            batch = batch[:max(max_rows, 0)]
        self._decided_by = self._control = self._decision = None
        ks = self._final_ks(batch, self.k_chooser(batch)) if batch else []
        fixed, fixed_conf, match_lens = self._ngram_drafts(batch, ks)
        if fixed is not None:
            ks = [len(f) if f is not None else k for f, k in zip(fixed, ks)]
        self.chosen_k_sum += sum(ks)
        self.chosen_k_rows += len(ks)
        count_values(self.chosen_k_counts, ks)
        # Decoding anywhere (this step's rows, or a pipelined step in flight) keeps the
        # budget; only a loop with nobody decoding may take the idle one.
        budget = self.step_budget(decoding=bool(batch) or any(
            r.prefill_done and not r.finished for r in self.running))
        left = math.inf if budget is None else budget - sum(k + 1 for k in ks)
        prefill = self._plan_prefill(left, busy, budget)
        if not (release or prefill or batch):
            return None
        new_tokens = []
        for r in batch:
            new_tokens.append(r.unsynced_draft)
            r.unsynced_draft = []
        control = self._control if any(ks) else None
        plan = StepPlan(release, prefill, [r.request_id for r in batch], new_tokens, ks, control,
                        fixed, fixed_conf)
        if fixed is not None:
            self._ngram_rows[id(plan)] = match_lens
        if self._decided_by is not None:
            # Kept per plan: with pipelining another plan is decided before this one returns.
            self._in_flight[id(plan)] = (self._decided_by, self._decision)
        return plan

    def step_budget(self, decoding: bool) -> int | None:
        """The step's token budget: `max_num_batched_tokens` while requests decode (it
        bounds the gap between their tokens); a step that decodes nothing keeps no one
        waiting and may prefill up to `max_prefill_tokens_idle` (if larger), the chunk
        size where prefill is efficient."""
        budget, idle = self.limits.max_num_batched_tokens, self.limits.max_prefill_tokens_idle
        if decoding or budget is None or idle is None:
            return budget
        return max(budget, idle)

    def _plan_prefill(self, left: float, busy, budget: int | None) -> list[PrefillItem]:
        """Chunks of prompts within `left` tokens: unfinished prompts first, then arrivals."""
        if budget is not None:
            # Decode rows come first, but arrivals are never starved: prefill always gets
            # at least a quarter of the budget.
            left = max(left, budget // 4, 1)
        items: list[PrefillItem] = []
        started = [r for r in self.running if not r.prefill_done and r.request_id not in busy]
        free = self.limits.max_num_seqs - len(self.running)
        for req in itertools.chain(started, self._admit(free, left, started)):
            if left < 1:
                break
            ids = req.prefill_ids     # the prompt (+ committed output when re-admitted)
            start = req.num_prefilled
            end = int(min(len(ids), start + left))
            items.append(PrefillItem(req.request_id, ids[start:end],
                                     req.params.seq_sampling(self.vocab_size),
                                     first=start == 0, last=end == len(ids)))
            req.num_prefilled = end
            left -= end - start
            if start == 0:
                self.running.append(req)
        return items

    def _admit(self, free: int, left: float, started: list[Request]) -> list[Request]:
        """Take waiting requests that get a slot and some of the budget: FIFO, or least
        TTFT slack first when the classes have TTFT budgets and not everyone fits."""
        left -= sum(len(r.prefill_ids) - r.num_prefilled for r in started)
        if free <= 0 or left < 1 or not self.waiting:
            return []
        if not self._slo_orders_admission or free >= len(self.waiting):
            order = list(range(len(self.waiting)))
        else:
            order = admission_order([(r.arrival_time, r.slo) for r in self.waiting],
                                    time.monotonic())
        chosen = []
        for i in order:
            if len(chosen) >= free or left < 1:
                break
            chosen.append(i)
            left -= len(self.waiting[i].prefill_ids)
        taken = set(chosen)
        admitted = [self.waiting[i] for i in chosen]
        # The rest keep their arrival order, so FIFO holds among equal classes.
        self.waiting = [r for i, r in enumerate(self.waiting) if i not in taken]
        return admitted

    def forget_plan(self, plan: StepPlan) -> None:
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
        if self._slo_caps_steps:
            now = time.monotonic()
            budgets = [r.slo.tpot_s for r in requests]
            slack = [_tpot_slack(r, now) for r in requests]
        state = BatchState(
            context_len=[r.context_len for r in requests],
            k_cap=self._final_ks(requests, [policy.max_k] * len(requests)),
            confidence_ema=[r.confidence_ema for r in requests],
            tpot_budget_s=budgets, tpot_slack_s=slack, queue_depth=len(self.waiting))
        decision = policy.decide(state)
        self._decided_by, self._decision = policy, decision
        self._control = decision.control
        return list(decision.max_k)

    def _final_ks(self, batch: Sequence[Request], chosen: Sequence[int]) -> list[int]:
        """Every cap on k, in one place: the request's own k, what is left of max_tokens
        and the context (the final token is always the target's), then the cluster bounds."""
        ks = []
        for req, k in zip(batch, chosen):
            if not self._can_draft(req):
                k = 0
            if req.num_speculative_tokens is not None:
                k = min(k, req.num_speculative_tokens)
            left = req.params.max_tokens - len(req.output_ids) - 1
            room = self.limits.max_model_len - req.context_len - 1
            ks.append(max(0, min(k, left, room)))
        return bound_ks(ks, self.bounds) if self.bounds != NO_BOUNDS else ks

    # -- apply --------------------------------------------------------------------------------
    def apply_step(self, plan: StepPlan, result: StepResult, seconds: float) -> list[RequestOutput]:
        """Commit what the workers produced; return the per-request deltas."""
        outputs: list[RequestOutput] = []
        by_id = {r.request_id: r for r in self.running}
        now = time.monotonic()
        ngram_rows = self._ngram_rows.pop(id(plan), None)   # match length per n-gram row
        for item, token in zip(plan.prefill, result.first_tokens):
            req = by_id.get(item.seq_id)
            if req is None or not item.last:
                continue
            if req.first_token_time is None:     # not again on re-admission
                req.first_token_time = now
            self._commit(req, [token])
            outputs.append(self._delta(req))
        if result.verify is not None:
            v = result.verify
            drafted = accepted = emitted_total = 0
            # Verified counts: an in-loop early stop or trim can leave them below the caps.
            verified = (result.proposal.num_draft_tokens.tolist() if result.proposal is not None
                        else plan.num_draft)
            match_lens = ngram_rows or [None] * len(plan.decode_ids)
            for rid, k, tokens, n_acc, n_match in zip(plan.decode_ids, verified, v.emitted,
                                                      v.num_accepted, match_lens):
                req = by_id.get(rid)
                if req is None:        # aborted while the step was in flight
                    continue
                req.spec.observe(num_draft=k, num_accepted=n_acc)
                self.ngram.observe(n_match, k, n_acc)
                self.totals.observe_drafter("ngram" if n_match is not None else
                                            "model" if k > 0 else "none", k, n_acc)
                drafted += k
                accepted += n_acc
                emitted_total += self._commit(req, tokens)
                outputs.append(self._delta(req))
            draft_s = result.proposal.seconds if result.proposal is not None else 0.0
            stats = StepStats(batch_size=len(plan.decode_ids), num_draft_tokens=drafted,
                              num_accepted_tokens=accepted, num_emitted_tokens=emitted_total,
                              draft_seconds=draft_s, verify_seconds=v.seconds,
                              total_seconds=seconds, prefill_seconds=result.prefill_seconds)
            self.recent_steps.append(stats)
            self.step_totals.add(stats)
            self.totals.merge_step(stats)
            decided = self._in_flight.pop(id(plan), None)
            if decided is not None and decided[0] is self.policy:
                self._feed_policy(plan, result, by_id, seconds, decided[1])
        self._retire_finished(now)
        return outputs

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

    def _retire_finished(self, now: float) -> None:
        done = [r for r in self.running if r.finished]
        if done:
            for r in done:
                self._record_slo(r, now)
            self.running = [r for r in self.running if not r.finished]
            self._release([r.request_id for r in done])

    def _record_slo(self, req: Request, finished_at: float) -> None:
        """Count a finished request toward its class's attainment (aborted ones never are)."""
        ttft, mean_tpot = request_latency(req.arrival_time, req.first_token_time, finished_at,
                                          len(req.output_ids))
        self.slo_tracker.record(req.slo, ttft, mean_tpot)

    def slo_summary(self) -> dict:
        """Per configured class: its budgets (None = none) and its finished requests'
        attainment and latencies. JSON-safe (no infinities)."""
        counts = self.slo_tracker.per_class
        out = {}
        for name, cls in sorted(self._slo.classes.items()):
            out[name] = {"ttft_budget_s": cls.ttft_s if math.isfinite(cls.ttft_s) else None,
                         "tpot_budget_s": cls.tpot_s if math.isfinite(cls.tpot_s) else None,
                         **counts.get(name, ClassAttainment()).summary()}
        return {"default_class": self._slo.default, "classes": out}

    # -- output -------------------------------------------------------------------------------
    def _commit(self, req: Request, tokens: list[int]) -> int:
        return commit_tokens(req, tokens, self.eos_token_id, self.tokenizer)

    @staticmethod
    def _delta(req: Request) -> RequestOutput:
        new_text = req.text.take(req.finished)
        new_ids = req.output_ids[req.sent_token_len:]
        req.sent_token_len = len(req.output_ids)
        return RequestOutput(req.request_id, new_ids, new_text, req.finished, req.finish_reason,
                             len(req.prompt_ids), len(req.output_ids), req.spec.copy())
