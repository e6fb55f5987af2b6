"""SpecRouter: the router deployment, a thin shell around the library objects.

One router replica owns a draft actor and a target actor, started inside the replica's
placement group (bundles: router, draft, target), and runs the continuous-batching step
loop: each step is one execution of `draft.step -> target.step` that carries every
running request. Scaling the router deployment scales whole router+draft+target groups.

    deployments/builder.py   actors, transport, engine, front door, telemetry
    deployments/http_api.py  OpenAI HTTP + SSE (routes over `install(self)`) ┐ both call
    deployments/grpc_api.py  gRPC (mixin SpecServeGrpc)                      ┘ self.front
    this file                handle API, runtime knobs (typed UserConfig), health
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

from ray import serve

from specserve_ray.api import validation as checks
from specserve_ray.config import AppConfig, SpeculationConfig
from specserve_ray.policy import CostModel
from specserve_ray.user_config import UserConfig

from deployments import http_api, wire
from deployments.builder import (build_serving, check_queueing, fit_cost_model,
                                 persist_learned, start_workers)
from deployments.grpc_api import SpecServeGrpc
from deployments.http_api import api


@serve.deployment(name="SpecRouter", max_ongoing_requests=128, health_check_period_s=10)
@serve.ingress(api)
class SpecRouter(SpecServeGrpc):
    def __init__(self, args: dict):
        wire.install()      # tensors in step messages travel as numpy (deployments/wire.py)
        self.cfg = AppConfig.model_validate(args)
        check_queueing(self.cfg, self.cfg.engine.limits.max_num_seqs,
                       self.cfg.max_queued_requests, "deployment settings")
        # The actors this replica owns, created in its placement group and recreated
        # when lost (deployments/worker_group.py).
        self.workers = start_workers(self.cfg)
        s = build_serving(self.cfg, self.workers)
        self.engine, self.serving, self.front = s.engine, s.loop, s.front
        self.telemetry, self.tokenizer, self.cost_model = s.telemetry, s.tokenizer, s.cost_model
        self.model_name = self.cfg.model_name
        self.created = int(time.time())
        http_api.install(self)

    # -- runtime knobs ----------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        """Apply Serve's user_config (specserve_ray/user_config.py) without restarting.

        Everything is validated before anything changes. Switching to an adaptive policy
        for the first time profiles the workers once (bounded by profile_budget_s, cached
        on disk); requests keep flowing meanwhile.
        """
        knobs = UserConfig.parse(user_config)
        knobs.check_against(self.cfg.engine.limits.max_num_seqs)
        check_queueing(self.cfg, knobs.max_num_seqs or self.engine.limits.max_num_seqs,
                       (self.front.bounds.max_queued_requests if knobs.max_queued_requests
                        is None else knobs.max_queued_requests), "user_config")
        updates = {k: v for k, v in (("num_speculative_tokens", knobs.num_speculative_tokens),
                                     ("policy", knobs.policy),
                                     ("profile_budget_s", knobs.profile_budget_s),
                                     # n-gram drafting
                                     ("drafter", knobs.drafter),
                                     ("prompt_lookup_min", knobs.prompt_lookup_min),
                                     ("prompt_lookup_max", knobs.prompt_lookup_max),
                                     ("yield_to_prompts", knobs.yield_to_prompts))
                   if v is not None}
        spec = None
        if updates:
            spec = SpeculationConfig(**{**self.engine.speculation.model_dump(), **updates})
        if spec is not None:
            if spec.needs_cost_model and self.cost_model is None:
                # Pause the step loop: profiling shares the workers' models and slots.
                async with self.serving.paused():
                    self.cost_model = CostModel.from_dict(
                        await fit_cost_model(self.cfg, self.workers, spec))
                self.engine.cost_model = self.cost_model
                persist_learned(self.cfg, self.engine)
            self.engine.speculation = spec
        if knobs.max_num_seqs is not None:
            self.engine.limits = self.engine.limits.model_copy(
                update={"max_num_seqs": knobs.max_num_seqs})
        self.front.set_queue_bounds(knobs.max_queued_requests, knobs.max_queued_tokens)
        if knobs.pipeline is not None:
            self.serving.pipeline = knobs.pipeline
        if knobs.slo is not None:
            # Replaces the classes between steps (running requests keep the class objects
            # they resolved on arrival).
            self.engine.slo = knobs.slo

    async def check_health(self) -> None:
        """Liveness: green while a worker is being recovered (bounded); red only when
        recovery failed or the step loop is gone, so Serve replaces the replica."""
        self.telemetry.start()     # no-op once running (started here if __init__ had no loop)
        self.serving.start()       # so a dead worker is recovered even while idle
        await self.workers.check()

    async def __del__(self):
        """Graceful drain (Serve calls this on shutdown, redeploy or downscale, after its
        own drain of ongoing calls): stop admitting (503 + Retry-After), let running
        requests finish within faults.drain_timeout_s, then release the workers."""
        serving = getattr(self, "serving", None)
        if serving is not None:
            await serving.drain(self.cfg.faults.drain_timeout_s)
        workers = getattr(self, "workers", None)
        if workers is not None:
            workers.shutdown()
        front = getattr(self, "front", None)
        if front is not None:
            front.close()

    # -- Python handle API ------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], stream: bool = False,
                       request_id: str | None = None, num_speculative_tokens: int | None = None,
                       slo_class: str | None = None, timeout_s: float | None = None,
                       **sampling: Any):
        """Generate a completion for `prompt` (text or token ids).

        Sampling keywords are those of `SamplingParams` (max_tokens, temperature, top_p,
        top_k, seed, stop, ignore_eos); `slo_class` names a configured latency class
        (None = the default one); `request_id` is a label echoed back (the server uses its
        own ids). Returns a dict with request_id, text, token_ids, finish_reason,
        prompt_tokens, completion_tokens and speculation. `timeout_s` bounds the request
        (at most faults.request_timeout_s). With `stream=True` (call through
        `handle.options(stream=True)`) it yields one dict per step with the new text and
        token ids instead.
        """
        prompt, params, num_speculative_tokens, slo_class = checks.handle_call(
            prompt, num_speculative_tokens, slo_class, sampling)
        if stream:
            return self._stream_dicts(prompt, params, request_id, num_speculative_tokens,
                                      slo_class, timeout_s)
        return await self.front.generate(prompt, params, request_id, num_speculative_tokens,
                                         slo_class, timeout_s=timeout_s)

    async def _stream_dicts(self, prompt, params, request_id, k, slo_class, timeout_s=None):
        async with contextlib.aclosing(self.front.stream(prompt, params, request_id, k,
                                                         slo_class, timeout_s=timeout_s)) as outputs:
            async for out in outputs:
                yield {"request_id": out.request_id, "text": out.new_text,
                       "token_ids": out.new_token_ids, "finished": out.finished,
                       "finish_reason": out.finish_reason, "prompt_tokens": out.num_prompt_tokens,
                       "completion_tokens": out.num_output_tokens,
                       "speculation": out.spec.summary()}

    def stats_dict(self) -> dict:
        return {**self.serving.stats(), "admission": self.front.stats()}

    async def stats(self) -> dict:
        return self.stats_dict()

    async def metrics_snapshot(self) -> dict:
        """The exported metrics as totals since start, current bounds, controller state."""
        return self.telemetry.snapshot()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook (deployments/autoscaling.py reads them)."""
        return self.telemetry.autoscaling_stats()

    async def worker_stats(self) -> dict:
        """Per-actor forward counts and live sequences (ordinary calls beside the graph)."""
        return await self.workers.worker_stats()

    async def worker_pids(self) -> dict:
        """The worker actors' and this replica's process ids (fault drills kill and
        measure them for real)."""
        import os

        return {**await self.workers.pids(), "router": os.getpid()}

    async def inject_fault(self, role: str, action: str, at_step: int | None = None,
                           request: str | None = None, stall_s: float = 5.0,
                           token: int | None = None) -> int:
        """TESTS ONLY: make a live worker raise, stall or die on its `at_step`-th next
        step, or on steps carrying a sequence whose prompt held `token`. Refused unless
        faults.allow_fault_injection."""
        from specserve_ray.config import FaultSpecConfig
        from specserve_ray.errors import RequestError

        if not self.cfg.faults.allow_fault_injection:
            raise RequestError("fault injection is off (faults.allow_fault_injection)")
        return await self.workers.arm_fault(FaultSpecConfig(
            role=role, action=action, at_step=at_step, request=request, stall_s=stall_s,
            token=token))
