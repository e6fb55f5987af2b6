"""SpecEngine: the scheduler with its draft and target workers in this process.

    plan (scheduler) ──> draft.propose ──> target.verify ──> apply (scheduler)

The in-process runner for tests, benchmarks and the demo; the deployment runs the same
scheduler with the workers in Ray actors (`SpecEngine.remote` plans and applies only).
Workers are used through their methods only, so a Ray-backed proxy with the same methods
can stand in for them.
"""
from __future__ import annotations

import time
from typing import Sequence

from specserve_ray.config import EngineConfig, LimitsConfig, SloConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.models.runner import ModelRunner
from specserve_ray.policy import CostModel
from specserve_ray.policy.slo import SloRegistry
from specserve_ray.request import GenerationResult, Request, RequestOutput
from specserve_ray.scheduler import Scheduler
from specserve_ray.speculation_choice import KChooser
from specserve_ray.step_timing import StepTiming
from specserve_ray.workers.draft import DraftWorker
from specserve_ray.workers.host import run_draft, run_target
from specserve_ray.workers.target import TargetWorker

__all__ = ["SpecEngine", "Request", "RequestOutput", "GenerationResult",
           "check_pair_compatible"]


def check_pair_compatible(target_tokenizer, draft_tokenizer, target_vocab: int, draft_vocab: int):
    """A draft must speak the target's vocabulary token for token."""
    if target_vocab != draft_vocab:
        raise ValueError(f"draft vocabulary ({draft_vocab}) differs from the target's "
                         f"({target_vocab}); speculative decoding needs one shared tokenizer")
    if draft_tokenizer is not None and target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError("draft and target tokenizers differ; speculative decoding needs "
                         "one shared tokenizer")


class SpecEngine(Scheduler):
    def __init__(self, target: TargetWorker | None, draft: DraftWorker | None, tokenizer,
                 limits: LimitsConfig | None = None, speculation: SpeculationConfig | None = None,
                 k_chooser: KChooser | None = None, cost_model: CostModel | None = None,
                 slo: SloConfig | SloRegistry | None = None):
        super().__init__(tokenizer, target.vocab_size if target is not None else None,
                         draft is not None, limits, speculation, k_chooser, cost_model, slo)
        self.target = target
        self.draft = draft
        # Local workers free a finished request's caches at once.
        self.release_eagerly = target is not None

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
        key = None
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
        engine = cls(target, draft, tokenizer, config.limits, config.speculation,
                     k_chooser, cost_model, config.slo)
        if key is not None and spec.synthetic_acceptance_rate is None:
            # Resume what the last run learned (acceptance, calibration, goodput) and keep
            # saving it beside the profile. Synthetic acceptance would teach it lies.
            from specserve_ray.policy.profile import attach_persistence

            attach_persistence(engine.chooser, cache_dir, key)
        return engine

    @classmethod
    def remote(cls, tokenizer, vocab_size: int, has_draft: bool, limits: LimitsConfig,
               speculation: SpeculationConfig, k_chooser: KChooser | None = None,
               cost_model: CostModel | None = None, slo: SloConfig | None = None):
        """An engine that only plans and applies; the workers live elsewhere (Ray actors)."""
        engine = cls(None, None, tokenizer, limits, speculation, k_chooser, cost_model, slo)
        engine.has_draft, engine.vocab_size = has_draft, vocab_size
        return engine

    def _release_now(self) -> None:
        ids, self._to_release = self._to_release, []
        if ids:
            self.target.release(ids)
            if self.draft is not None:
                self.draft.release(ids)

    # -- running in this process ----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step in-process: the workers are called directly."""
        planning = time.perf_counter()
        plan = self.plan_step()
        if plan is None:
            return []
        start = time.perf_counter()
        result = run_target(self.target, run_draft(self.draft, plan))
        applying = time.perf_counter()
        outputs = self.apply_step(plan, result, applying - start)
        if result.verify is not None:    # the steps step_totals counts (as the router does)
            self.step_totals.add_router(StepTiming(plan=start - planning,
                                                   apply=time.perf_counter() - applying))
        return outputs

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
                        req.request_id, req.prompt_ids, list(req.output_ids), req.text.text,
                        req.finish_reason, req.spec.copy())
        return [by_id[r] for r in rids]
