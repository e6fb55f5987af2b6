"""Scheduler: plans every step and applies its result; knows requests, not models.

    waiting ──admit──> prefilling ──last chunk scored──> decoding ──EOS/stop/length──> done

A step's plan, under a token budget (`limits.max_num_batched_tokens`, vLLM's name; a step
with no decode row may prefill up to `limits.max_prefill_tokens_idle`):
  1. decode rows first: every decoding request verifies its pending token + k_i drafts
     (k_i, n-gram drafts and the in-loop control from `self.chooser`, a
     `speculation_choice.SpeculationChooser`: the policy and every cap on k);
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
from typing import Sequence

from specserve_ray.config import LimitsConfig, SloConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.contracts import PrefillItem, StepPlan, StepResult
from specserve_ray.errors import RequestError
from specserve_ray.output import commit_tokens
from specserve_ray.policy import CostModel
from specserve_ray.policy.prefill_share import tpot_step_budget
from specserve_ray.policy.step_time_law import StepTimeLaw
from specserve_ray.policy.slo import (SloClass, SloRegistry, SloTracker, admission_order,
                                      request_latency)
from specserve_ray.request import Request, RequestOutput
from specserve_ray.speculation_choice import KChooser, SpeculationChooser
from specserve_ray.stats import SpecStats, StepStats, StepTotals


class Scheduler:
    def __init__(self, tokenizer, vocab_size: int | None, has_draft: bool,
                 limits: LimitsConfig | None = None, speculation: SpeculationConfig | None = None,
                 k_chooser: KChooser | None = None, cost_model: CostModel | None = None,
                 slo: SloConfig | SloRegistry | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.limits = limits or LimitsConfig()
        # Each decode row's drafter and k, the policy and what it learns, every cap on k.
        self.chooser = SpeculationChooser(self, has_draft, speculation, k_chooser, cost_model)
        self.eos_token_id = tokenizer.eos_token_id
        self.waiting: list[Request] = []
        self.running: list[Request] = []     # admitted: prefilling or decoding
        self._ids = itertools.count()
        # Releases travel with the next plan (one message per step); an in-process engine
        # with local workers releases at once instead (`release_eagerly`).
        self.release_eagerly = False
        self._to_release: list[str] = []
        self.recent_steps: deque[StepStats] = deque(maxlen=1024)   # for the cost model
        # Recent decode steps' seconds: per step token (fixed costs spread in), and the
        # fixed + per-token law fitted to them (TPOT-room budget, prefill_share.py).
        self.token_s_ema = 0.0
        self.step_law = StepTimeLaw()
        self.step_totals = StepTotals()
        self.totals = SpecStats()
        self.slo = slo or SloConfig()
        self.slo_tracker = SloTracker()    # attainment of finished requests, per class name

    # -- knobs --------------------------------------------------------------------------------
    # Set from many places (router reconfigure, benchmarks, supervision); they live on the
    # chooser, which reads them every step.
    @property
    def speculation(self) -> SpeculationConfig:
        return self.chooser.speculation

    @speculation.setter
    def speculation(self, spec: SpeculationConfig) -> None:
        """Switch speculation (policy included) between steps; the old one stays on error."""
        self.chooser.speculation = spec

    @property
    def cost_model(self) -> CostModel | None:
        return self.chooser.cost_model

    @cost_model.setter
    def cost_model(self, cost: CostModel | None) -> None:
        self.chooser.cost_model = cost

    @property
    def has_draft(self) -> bool:
        """Whether a draft model is up (supervision clears it while the draft side is down)."""
        return self.chooser.has_draft

    @has_draft.setter
    def has_draft(self, up: bool) -> None:
        self.chooser.has_draft = up

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
        self.chooser.tpot_budgets = any(math.isfinite(c.tpot_s) for c in classes)
        self.chooser.ttft_budgets = self._slo_orders_admission
        self._slo = registry

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
        # Decoding anywhere (this step's rows, or a pipelined step in flight) keeps the
        # budget; only a loop with nobody decoding may take the idle one.
        budget = self.step_budget(decoding=bool(batch) or any(
            r.prefill_done and not r.finished for r in self.running))
        if budget is not None and batch and self.chooser.tpot_budgets and self._prompts_wait():
            budget = self._tpot_budget(batch, budget)
        self.chooser.step_budget = budget
        ks, fixed, fixed_conf, control = self.chooser.choose(batch)
        left = math.inf if budget is None else budget - sum(k + 1 for k in ks)
        prefill = self._plan_prefill(left, busy, budget)
        if not (release or prefill or batch):
            return None
        new_tokens = []
        for r in batch:
            new_tokens.append(r.unsynced_draft)
            r.unsynced_draft = []
        plan = StepPlan(release, prefill, [r.request_id for r in batch], new_tokens, ks, control,
                        fixed, fixed_conf)
        self.chooser.track(plan)
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

    def _prompts_wait(self) -> bool:
        return bool(self.waiting) or any(not r.prefill_done and not r.finished
                                         for r in self.running)

    def _tpot_budget(self, batch: list[Request], budget: int) -> int:
        """The budget grown into the decode rows' TPOT room while prompts wait
        (policy/prefill_share.py), up to the idle budget."""
        now = time.monotonic()
        fixed_s, token_s = self.step_law.law() or (0.0, self.token_s_ema)
        return tpot_step_budget(budget, self.limits.max_prefill_tokens_idle or budget,
                                [r.slo.tpot_s for r in batch],
                                [r.tpot_slack(now) for r in batch], token_s, fixed_s)

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

    def pending_prompts(self, now: float) -> list[tuple[int, float]]:
        """(prompt tokens left, TTFT slack in seconds) of the prompts the coming steps will
        prefill, in that order: half-prefilled ones, then waiting ones that get a free
        slot, in admission order. Slack is +inf without a TTFT budget or once a first token
        was sent (a re-admitted request)."""
        out = [(len(r.prefill_ids) - r.num_prefilled, r.ttft_slack(now)) for r in self.running
               if not r.prefill_done and not r.finished]
        free = self.limits.max_num_seqs - len(self.running)
        if free > 0 and self.waiting:
            order = (admission_order([(r.arrival_time, r.ttft_budget()) for r in self.waiting],
                                     now)
                     if self._slo_orders_admission else range(len(self.waiting)))
            out += [(len(self.waiting[i].prefill_ids), self.waiting[i].ttft_slack(now))
                    for i in list(order)[:free]]
        return out

    def _admit(self, free: int, left: float, started: list[Request]) -> list[Request]:
        """Take waiting requests that get a slot and some of the budget: FIFO, or least
        TTFT slack first when the classes have TTFT budgets and not everyone fits."""
        left -= sum(len(r.prefill_ids) - r.num_prefilled for r in started)
        if free <= 0 or left < 1 or not self.waiting:
            return []
        if not self._slo_orders_admission or free >= len(self.waiting):
            order = list(range(len(self.waiting)))
        else:
            order = admission_order([(r.arrival_time, r.ttft_budget()) for r in self.waiting],
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
        self.chooser.forget(plan)

    # -- apply --------------------------------------------------------------------------------
    def apply_step(self, plan: StepPlan, result: StepResult, seconds: float) -> list[RequestOutput]:
        """Commit what the workers produced; return the per-request deltas."""
        outputs: list[RequestOutput] = []
        by_id = {r.request_id: r for r in self.running}
        now = time.monotonic()
        ngram_rows = self.chooser.take_ngram_rows(plan)   # match length per n-gram row
        for item, token in zip(plan.prefill, result.first_tokens):
            req = by_id.get(item.seq_id)
            if req is None or not item.last:
                continue
            if req.first_token_time is None:     # not again on re-admission
                req.first_token_time = now
            self._commit(req, [token])
            outputs.append(req.take_delta())
        if result.verify is not None:
            v = result.verify
            drafted = accepted = emitted_total = 0
            # Verified counts: an in-loop early stop or trim can leave them below the caps.
            verified = (result.proposal.num_draft_tokens.tolist() if result.proposal is not None
                        else plan.num_draft)
            match_lens = ngram_rows or [None] * len(plan.decode_ids)
            ngram = self.chooser.ngram     # per row below: its acceptance by match length
            for rid, k, tokens, n_acc, n_match in zip(plan.decode_ids, verified, v.emitted,
                                                      v.num_accepted, match_lens):
                req = by_id.get(rid)
                if req is None:        # aborted while the step was in flight
                    continue
                req.spec.observe(num_draft=k, num_accepted=n_acc)
                ngram.observe(n_match, k, n_acc)
                self.totals.observe_drafter("ngram" if n_match is not None else
                                            "model" if k > 0 else "none", k, n_acc)
                drafted += k
                accepted += n_acc
                emitted_total += self._commit(req, tokens)
                outputs.append(req.take_delta())
            draft_s = result.proposal.seconds if result.proposal is not None else 0.0
            stats = StepStats(batch_size=len(plan.decode_ids), num_draft_tokens=drafted,
                              num_accepted_tokens=accepted, num_emitted_tokens=emitted_total,
                              draft_seconds=draft_s, verify_seconds=v.seconds,
                              total_seconds=seconds, prefill_seconds=result.prefill_seconds)
            step_tokens = sum(k + 1 for k in verified) + sum(len(p.prompt_ids)
                                                              for p in plan.prefill)
            if step_tokens and seconds > 0:      # seconds per step token, fixed costs in
                per_token = seconds / step_tokens
                self.token_s_ema = per_token if self.token_s_ema <= 0 else \
                    0.8 * self.token_s_ema + 0.2 * per_token
                self.step_law.observe(step_tokens, seconds)
            self.recent_steps.append(stats)
            self.step_totals.add(stats)
            self.totals.merge_step(stats)
            self.chooser.observe_step(plan, result, by_id, seconds)
        self._retire_finished(now)
        return outputs

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
        self.slo_tracker.record(req.slo, ttft, mean_tpot, len(req.prompt_ids))

    def slo_summary(self) -> dict:
        """Per configured class: budgets, attainment and latencies (SloTracker.report)."""
        return self.slo_tracker.report(self._slo)

    # -- output -------------------------------------------------------------------------------
    def _commit(self, req: Request, tokens: list[int]) -> int:
        return commit_tokens(req, tokens, self.eos_token_id, self.tokenizer)
