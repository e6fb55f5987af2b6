"""SpecEngine: the continuous-batching speculative step loop, in one process.

    waiting ──admit──> running ──step──> finished
                         │
      each step: draft.propose(all running, k_i each)   one draft call (k_i = 0 skips)
                 target.verify(all running)             one target forward for the batch
                 commit emitted tokens, check EOS / stop strings / max_tokens

Requests join and leave between steps. The speculation length of every request is an
input to each step (`k_chooser`); k = 0 for all rows is plain decoding and makes no draft
call. Workers are used through their methods only, so a Ray-backed proxy with the same
methods can stand in for them (the deployment does exactly that).
"""
from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from specserve_ray.config import (EngineConfig, LimitsConfig, SamplingParams, SloConfig,
                                   SpeculationConfig)
from specserve_ray.errors import RequestError
from specserve_ray.models.runner import ModelRunner
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy import (BatchState, CostModel, SpeculationPolicy, StepFeedback,
                                  make_policy, update_confidence_ema)
from specserve_ray.policy.cluster import bound_ks
from specserve_ray.contracts import RuntimeBounds
from specserve_ray.policy.slo import (NO_SLO, ClassAttainment, SloClass, SloRegistry, SloTracker,
                                     admission_order)
from specserve_ray.stats import SpecStats, StepStats, StepTotals, count_values
from specserve_ray.workers.draft import DraftWorker
from specserve_ray.workers.target import TargetWorker
from specserve_ray.contracts import StepPlan, StepResult
from specserve_ray.workers.host import run_draft, run_target
from specserve_ray.contracts import PrefillItem


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    num_speculative_tokens: int | None = None    # per-request override of the static k
    slo: SloClass = NO_SLO                        # latency class (TTFT / TPOT budgets)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent_text_len: int = 0
    sent_token_len: int = 0
    unsynced_draft: list[int] = field(default_factory=list)  # emitted, not yet told to draft
    finished: bool = False
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    spec: SpecStats = field(default_factory=SpecStats)
    confidence_ema: float = 0.5     # running mean draft confidence (adaptive policies)

    @property
    def context_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    spec: SpecStats


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    spec: SpecStats


KChooser = Callable[[Sequence[Request]], list[int]]
_NO_BOUNDS = RuntimeBounds()


def check_pair_compatible(target_tokenizer, draft_tokenizer, target_vocab: int, draft_vocab: int):
    """A draft must speak the target's vocabulary token for token."""
    if target_vocab != draft_vocab:
        raise ValueError(f"draft vocabulary ({draft_vocab}) differs from the target's "
                         f"({target_vocab}); speculative decoding needs one shared tokenizer")
    if draft_tokenizer is not None and target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError("draft and target tokenizers differ; speculative decoding needs "
                         "one shared tokenizer")


class SpecEngine:
    def __init__(self, target: TargetWorker, draft: DraftWorker | None, tokenizer,
                 limits: LimitsConfig | None = None, speculation: SpeculationConfig | None = None,
                 k_chooser: KChooser | None = None, cost_model: CostModel | None = None,
                 slo: SloConfig | SloRegistry | None = None):
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.limits = limits or LimitsConfig()
        self.cost_model = cost_model
        self.policy: SpeculationPolicy | None = None
        self._decided_by: SpeculationPolicy | None = None   # the policy planning this step
        # id(plan) -> (policy that decided it, mean context) until the plan is applied.
        self._in_flight: dict[int, tuple[SpeculationPolicy, float]] = {}
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
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.has_draft = draft is not None
        self.vocab_size = target.vocab_size if target is not None else None
        # In-process workers are released at once; a remote step loop sends releases
        # with the next plan instead (one message per step).
        self.release_eagerly = True
        self._to_release: list[str] = []
        self.recent_steps: deque[StepStats] = deque(maxlen=1024)   # for the cost model
        self.step_totals = StepTotals()
        self.totals = SpecStats()
        self.slo = slo or SloConfig()
        self.slo_tracker = SloTracker()    # attainment of finished requests, per class name

    # -- construction -------------------------------------------------------------------------
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
            policy = make_policy(spec.policy, self.cost_model,
                                 max_k=spec.num_speculative_tokens)
        self._speculation, self.policy = spec, policy
        self.chosen_k_sum = self.chosen_k_rows = 0
        self.apply_bounds(self.bounds)

    def apply_bounds(self, bounds: RuntimeBounds) -> None:
        """Cap speculation from outside (cluster controller), for every policy, static
        included; the caps survive policy switches. They only ever lower k (lossless)."""
        self.bounds = bounds
        if self.policy is not None:
            self.policy.apply_bounds(bounds.speculation_enabled,
                                     self.policy.max_k if bounds.max_k is None else bounds.max_k,
                                     bounds.verify_budget)

    @property
    def mean_chosen_k(self) -> float:
        """Mean k per decode row (after clamping) since the policy last changed."""
        return self.chosen_k_sum / self.chosen_k_rows if self.chosen_k_rows else 0.0

    @classmethod
    def from_config(cls, config: EngineConfig | None = None, k_chooser: KChooser | None = None,
                    cost_model: CostModel | None = None, cache_dir: str | None = None):
        """Load both models; with an adaptive policy and no `cost_model`, profile the
        local runners (within speculation.profile_budget_s; cached on disk)."""
        config = config or EngineConfig()
        lim = config.limits
        target_runner, tokenizer = ModelRunner.from_config(
            config.target, lim.max_num_seqs, lim.max_model_len, name="target")
        draft = None
        if config.draft is not None:
            draft_runner, draft_tok = ModelRunner.from_config(
                config.draft, lim.max_num_seqs, lim.max_model_len, name="draft")
            check_pair_compatible(tokenizer, draft_tok, target_runner.vocab_size,
                                  draft_runner.vocab_size)
            draft = DraftWorker(draft_runner)
        spec = config.speculation
        if cost_model is None and spec.needs_cost_model:
            from specserve_ray.policy.profile import (cost_model_key, load_or_profile,
                                                      profile_cost_model, profile_runner)

            key = cost_model_key(config.target.path,
                                 config.draft.path if config.draft is not None else None,
                                 config.target.dtype, config.target.device)
            draft_profile = None
            if draft is not None:
                def draft_profile(grid, budget):
                    return profile_runner(draft.runner, "draft", grid, 2, budget)

            cost_model = load_or_profile(cache_dir, key, lambda: profile_cost_model(
                lambda grid, budget: profile_runner(target_runner, "verify", grid, 2, budget),
                draft_profile, lim.max_num_seqs, spec.num_speculative_tokens,
                lim.max_model_len, spec.profile_budget_s))
        target = TargetWorker(target_runner, spec.synthetic_acceptance_rate)
        return cls(target, draft, tokenizer, config.limits, config.speculation,
                   k_chooser, cost_model, config.slo)

    @classmethod
    def remote(cls, tokenizer, vocab_size: int, has_draft: bool, limits: LimitsConfig,
               speculation: SpeculationConfig, k_chooser: KChooser | None = None,
               cost_model: CostModel | None = None, slo: SloConfig | None = None):
        """An engine that only plans and applies; the workers live elsewhere (Ray actors)."""
        engine = cls(None, None, tokenizer, limits, speculation, k_chooser, cost_model, slo)
        engine.has_draft, engine.vocab_size = has_draft, vocab_size
        engine.release_eagerly = False
        return engine

    def _static_k(self, requests: Sequence[Request]) -> list[int]:
        k = self.speculation.static_k
        return [k if r.num_speculative_tokens is None else r.num_speculative_tokens
                for r in requests]

    def _choose_k(self, requests: Sequence[Request]) -> list[int]:
        """The default k_chooser: the static k, or the policy's per-request caps."""
        policy = self.policy
        if policy is None:
            return self._static_k(requests)
        state = BatchState(
            context_len=[r.context_len for r in requests],
            remaining_tokens=[r.params.max_tokens - len(r.output_ids) for r in requests],
            confidence_ema=[r.confidence_ema for r in requests],
            tpot_budget_s=[r.slo.tpot_s for r in requests] if self._slo_caps_steps else None,
            queue_depth=len(self.waiting))
        decision = policy.decide(state)
        self._decided_by = policy
        self._control = decision.control
        # A per-request num_speculative_tokens caps what the policy chose.
        return [k if r.num_speculative_tokens is None else min(k, r.num_speculative_tokens)
                for r, k in zip(requests, decision.max_k)]

    # -- requests -----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty")
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = list(prompt)
        vocab = self.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
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
            raise RequestError("prompt is empty")
        if len(prompt_ids) >= lim.max_model_len:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; the context holds "
                               f"{lim.max_model_len} including at least one output token")
        if params.max_tokens > lim.max_tokens:
            raise RequestError(f"max_tokens {params.max_tokens} exceeds the limit {lim.max_tokens}")
        if len(prompt_ids) + params.max_tokens > lim.max_model_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context length {lim.max_model_len}")
        if num_speculative_tokens is not None and not 0 <= num_speculative_tokens <= 16:
            raise RequestError("num_speculative_tokens must be in [0, 16]")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if any(r.request_id == rid for r in itertools.chain(self.waiting, self.running)):
            raise RequestError(f"request id {rid!r} is already in use")
        self.waiting.append(Request(rid, prompt_ids, params, num_speculative_tokens, slo))
        return rid

    def resolve_slo_class(self, name: str | None) -> SloClass:
        """The class a request named (None = the default); RequestError if unknown."""
        if name is not None and not isinstance(name, str):
            raise RequestError(f"slo_class must be a string, got {type(name).__name__}")
        try:
            return self._slo.get(name)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its caches on both workers."""
        for queue in (self.waiting, self.running):
            for r in queue:
                if r.request_id == request_id:
                    queue.remove(r)
                    if queue is self.running:
                        self._to_release.append(request_id)
                        if self.release_eagerly:
                            self._release_now()
                    return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step: plan (here) -> execute (workers) -> apply (here) ---------------------------
    def step(self) -> list[RequestOutput]:
        """One step in-process: the workers are called directly."""
        plan = self.plan_step()
        if plan is None:
            return []
        start = time.perf_counter()
        result = run_target(self.target, run_draft(self.draft, plan))
        return self.apply_step(plan, result, time.perf_counter() - start)

    def plan_step(self, busy: frozenset[str] | set[str] = frozenset(),
                  max_rows: int | None = None) -> StepPlan | None:
        """Admit waiting requests, choose every running request's k, release finished ones.

        `busy` are requests in a step still in flight (draft/verify pipelining): they are
        left out, so a request is in at most one step at a time. `max_rows` caps the
        decode batch, to split the running requests into micro-batches.
        """
        admitted = self._admit(self.limits.max_num_seqs - len(self.running))
        release, self._to_release = self._to_release, []
        batch = [r for r in self.running if not r.finished and r.request_id not in busy]
        if max_rows is not None:
            batch = batch[:max(max_rows, 0)]
        self._decided_by = self._control = None
        ks = [self._clamp_k(r, k) for r, k in zip(batch, self.k_chooser(batch))] if batch else []
        ks = bound_ks(ks, self.bounds) if self.bounds != _NO_BOUNDS else ks
        self.chosen_k_sum += sum(ks)
        self.chosen_k_rows += len(ks)
        count_values(self.chosen_k_counts, ks)
        prefill = []
        for req in admitted:
            prefill.append(PrefillItem(req.request_id, req.prompt_ids,
                                       req.params.seq_sampling(self.vocab_size)))
            self.running.append(req)
        if not (release or prefill or batch):
            return None
        new_tokens = []
        for r in batch:
            new_tokens.append(r.unsynced_draft)
            r.unsynced_draft = []
        control = self._control if any(ks) else None
        plan = StepPlan(release, prefill, [r.request_id for r in batch], new_tokens, ks, control)
        if self._decided_by is not None:
            # Kept per plan: with pipelining another plan is decided before this one returns.
            context = sum(r.context_len for r in batch) / len(batch)
            self._in_flight[id(plan)] = (self._decided_by, context)
        return plan

    def forget_plan(self, plan: StepPlan) -> None:
        """A plan that will never be applied (its execution failed)."""
        self._in_flight.pop(id(plan), None)

    def _admit(self, free: int) -> list[Request]:
        """Take up to `free` waiting requests: FIFO, or least TTFT slack first when the
        classes have TTFT budgets and not everyone fits (the only case where order matters)."""
        if free <= 0 or not self.waiting:
            return []
        if not self._slo_orders_admission or free >= len(self.waiting):
            admitted, self.waiting = self.waiting[:free], self.waiting[free:]
            return admitted
        order = admission_order([(r.arrival_time, r.slo) for r in self.waiting], time.monotonic())
        chosen = set(order[:free])
        admitted = [self.waiting[i] for i in order[:free]]
        # The rest keep their arrival order, so FIFO holds among equal classes.
        self.waiting = [r for i, r in enumerate(self.waiting) if i not in chosen]
        return admitted

    def apply_step(self, plan: StepPlan, result: StepResult, seconds: float) -> list[RequestOutput]:
        """Commit what the workers produced; return the per-request deltas."""
        outputs: list[RequestOutput] = []
        by_id = {r.request_id: r for r in self.running}
        now = time.monotonic()
        for item, token in zip(plan.prefill, result.first_tokens):
            req = by_id.get(item.seq_id)
            if req is None:
                continue
            req.first_token_time = now
            self._commit(req, [token])
            outputs.append(self._delta(req))
        if result.verify is not None:
            v = result.verify
            drafted = accepted = emitted_total = 0
            # Verified counts: an in-loop early stop or trim can leave them below the caps.
            verified = (result.proposal.num_draft_tokens.tolist() if result.proposal is not None
                        else plan.num_draft)
            for rid, k, tokens, n_acc in zip(plan.decode_ids, verified, v.emitted,
                                             v.num_accepted):
                req = by_id.get(rid)
                if req is None:        # aborted while the step was in flight
                    continue
                req.spec.observe(num_draft=k, num_accepted=n_acc)
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
                     context: float) -> None:
        """Per-request confidence EMAs, then the policy's own step feedback."""
        v, proposal = result.verify, result.proposal
        if proposal is not None:
            counts = proposal.drafted.numpy().astype(np.int64)
            verified = tuple(int(n) for n in proposal.num_draft_tokens)
        else:
            counts = np.asarray(plan.num_draft, np.int64)
            verified = None
        if proposal is not None and proposal.draft_confidence.shape[1] > 0:
            confidences = proposal.draft_confidence.numpy()
        else:
            confidences = np.zeros((len(plan.decode_ids), 0))
        ema = np.array([by_id[rid].confidence_ema if rid in by_id else 0.5
                        for rid in plan.decode_ids])
        ema = update_confidence_ema(ema, self.policy.calibrate(confidences), counts)
        for rid, value in zip(plan.decode_ids, ema):
            if rid in by_id:
                by_id[rid].confidence_ema = float(value)
        self.policy.observe(StepFeedback(
            num_drafted=tuple(int(k) for k in counts), num_accepted=tuple(v.num_accepted),
            step_seconds=seconds, num_verified=verified,
            draft_seconds=proposal.seconds if proposal is not None else None,
            verify_seconds=v.seconds, batch_size=len(plan.decode_ids), mean_context=context,
            confidences=confidences if confidences.shape[1] else None))
        if self.cost_model is not None and not plan.prefill:
            # What the step cost beside its two forwards (router, transport, bookkeeping).
            draft_s = proposal.seconds if proposal is not None else 0.0
            self.cost_model.observe_step_overhead(max(seconds - draft_s - v.seconds, 0.0))

    def _retire_finished(self, now: float) -> None:
        done = [r for r in self.running if r.finished]
        if done:
            for r in done:
                self._record_slo(r, now)
            self.running = [r for r in self.running if not r.finished]
            self._to_release.extend(r.request_id for r in done)
            if self.release_eagerly:
                self._release_now()

    def _record_slo(self, req: Request, finished_at: float) -> None:
        """Count a finished request toward its class's attainment (aborted ones never are)."""
        ttft = req.first_token_time - req.arrival_time
        later_tokens = len(req.output_ids) - 1
        mean_tpot = (finished_at - req.first_token_time) / later_tokens if later_tokens > 0 else None
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

    def _release_now(self) -> None:
        ids, self._to_release = self._to_release, []
        if ids:
            self.target.release(ids)
            if self.draft is not None:
                self.draft.release(ids)

    def _clamp_k(self, req: Request, k: int) -> int:
        # Never draft past max_tokens or the context: the final token is always the target's.
        left = req.params.max_tokens - len(req.output_ids) - 1
        room = self.limits.max_model_len - req.context_len - 1
        return max(0, min(k, left, room)) if self.has_draft else 0

    def _commit(self, req: Request, tokens: list[int]) -> int:
        """Append emitted tokens, honouring EOS, max_tokens and stop strings."""
        p = req.params
        kept = 0
        for tok in tokens:
            req.output_ids.append(tok)
            kept += 1
            if tok == self.eos_token_id and not p.ignore_eos:
                req.finished, req.finish_reason = True, "stop"
                break
            if len(req.output_ids) >= p.max_tokens:
                req.finished, req.finish_reason = True, "length"
                break
        req.unsynced_draft.extend(tokens[:kept])
        req.text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        if p.stop:
            # Search only where a new match can start.
            window_start = max(0, req.sent_text_len - max(len(s) for s in p.stop))
            hits = [i for i in (req.text.find(s, window_start) for s in p.stop) if i >= 0]
            if hits:
                req.text = req.text[: min(hits)]
                req.finished, req.finish_reason = True, "stop"
        return kept

    def _delta(self, req: Request) -> RequestOutput:
        text = req.text
        # Hold back a trailing partial UTF-8 character until its bytes are complete.
        visible = len(text) if req.finished or not text.endswith("\ufffd") else len(text) - 1
        new_text = text[req.sent_text_len:visible] if visible > req.sent_text_len else ""
        req.sent_text_len = max(req.sent_text_len, visible)
        new_ids = req.output_ids[req.sent_token_len:]
        req.sent_token_len = len(req.output_ids)
        return RequestOutput(req.request_id, new_ids, new_text, req.finished, req.finish_reason,
                             len(req.prompt_ids), len(req.output_ids), req.spec.copy())

    # -- convenience ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 num_speculative_tokens: Sequence[int | None] | None = None,
                 slo_classes: Sequence[str | None] | None = None) -> list[GenerationResult]:
        """Run prompts to completion together (continuous batching) and return results."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ks = num_speculative_tokens or [None] * len(prompts)
        classes = slo_classes or [None] * len(prompts)
        rids = [self.add_request(p, sp, num_speculative_tokens=k, slo_class=c)
                for p, sp, k, c in zip(prompts, params, ks, classes)]
        by_id = {}
        reqs = {r.request_id: r for r in self.waiting}
        while any(rid not in by_id for rid in rids):
            for out in self.step():
                if out.finished:
                    req = reqs[out.request_id]
                    by_id[out.request_id] = GenerationResult(
                        req.request_id, req.prompt_ids, list(req.output_ids), req.text,
                        req.finish_reason, req.spec.copy())
        return [by_id[r] for r in rids]
