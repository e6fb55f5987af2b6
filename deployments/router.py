"""SpecRouter: the central router deployment and every front door.

One router replica owns a draft actor and a target actor, started inside the replica's
placement group (bundles: router, draft, target), and runs the continuous-batching step
loop: each step is one execution of `draft.step -> target.step` that carries every
running request. HTTP (OpenAI-compatible), gRPC and DeploymentHandle calls all feed the
same loop. Scaling the router deployment scales whole router+draft+target groups.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specserve_ray.api import openai as oai
from specserve_ray.async_engine import AsyncSpecEngine, StepFailed
from specserve_ray.config import AppConfig, SamplingParams, SloConfig, SpeculationConfig
from specserve_ray.engine import SpecEngine
from specserve_ray.errors import OverloadedError, RequestError
from specserve_ray.policy import CostModel

from deployments.controller import controller_name
from deployments.telemetry import RouterTelemetry
from deployments.transport import ActorTransport, CompiledGraphTransport
from deployments.workers import DraftActor, TargetActor

log = logging.getLogger("specserve_ray")
api = FastAPI(title="SpecServe-Ray", docs_url=None, redoc_url=None)


def _actor_options(resources: dict[str, float], bundle_index: int) -> dict:
    res = dict(resources)
    opts: dict[str, Any] = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0)}
    if res:
        opts["resources"] = res
    pg = ray.util.get_current_placement_group()
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=False)
    return opts


def _status_for(exc: BaseException) -> int:
    if isinstance(exc, (RequestError, ValidationError)):
        return 400
    if isinstance(exc, OverloadedError):
        return 503
    return 500


def _message(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return oai.validation_message(exc)
    return str(exc)


def _error_response(exc: BaseException) -> JSONResponse:
    status = _status_for(exc)
    return JSONResponse(oai.error_body(_message(exc), status), status_code=status)


@api.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid"))
    return JSONResponse(oai.error_body("invalid request: " + "; ".join(parts), 400), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # e.g. a body that is not valid UTF-8: FastAPI answers 400 before validation.
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return JSONResponse(oai.error_body(f"invalid request: {detail}", exc.status_code),
                        status_code=exc.status_code)


@ray.remote(num_cpus=0)
def _fit_cost_model_task(target, draft, spec: dict, limits: dict, key: str) -> dict:
    """Profile the worker actors (bounded) unless the fitted model is cached; a task so
    that both start-up (sync) and reconfigure (async) can wait on it."""
    from specserve_ray.policy.profile import load_or_profile, profile_cost_model

    def verify(grid, budget):
        return ray.get(target.profile.remote("verify", grid, 2, budget))

    draft_fn = None
    if draft is not None:
        def draft_fn(grid, budget):
            return ray.get(draft.profile.remote("draft", grid, 2, budget))

    model = load_or_profile(None, key, lambda: profile_cost_model(
        verify, draft_fn, limits["max_num_seqs"], spec["num_speculative_tokens"],
        limits["max_model_len"], spec["profile_budget_s"]))
    return model.to_dict()


def _telemetry(serving: AsyncSpecEngine, cfg: AppConfig) -> RouterTelemetry:
    """Metrics export + controller reports for this replica, started on the running loop."""
    from deployments.metrics import RayMetricsExporter

    try:
        ctx = serve.get_replica_context()
        router_id, app = ctx.replica_tag, ctx.app_name
    except Exception:  # noqa: BLE001 - outside a replica (direct construction in tests)
        router_id, app = f"router-{id(serving):x}", None
    telemetry = RouterTelemetry(serving, cfg.signals, router_id, controller_name(app),
                                RayMetricsExporter() if cfg.signals.export_metrics else None)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return telemetry         # check_health starts it on the replica's loop
    telemetry.start()
    return telemetry


@serve.deployment(name="SpecRouter", max_ongoing_requests=128, health_check_period_s=10)
@serve.ingress(api)
class SpecRouter:
    def __init__(self, args: dict):
        from transformers import AutoTokenizer

        self.cfg = AppConfig.model_validate(args)
        eng_cfg = self.cfg.engine
        limits = eng_cfg.limits.model_dump()
        self.target = TargetActor.options(**_actor_options(self.cfg.target_resources, 2)).remote(
            eng_cfg.target.model_dump(), limits, eng_cfg.speculation.synthetic_acceptance_rate)
        self.draft = None
        if eng_cfg.draft is not None:
            self.draft = DraftActor.options(**_actor_options(self.cfg.draft_resources, 1)).remote(
                eng_cfg.draft.model_dump(), limits)
        target_info = ray.get(self.target.describe.remote())
        self.tokenizer = AutoTokenizer.from_pretrained(eng_cfg.target.path, local_files_only=True)
        if self.draft is not None:
            draft_info = ray.get(self.draft.describe.remote())
            if (draft_info["vocab_size"] != target_info["vocab_size"]
                    or draft_info["vocab"] != target_info["vocab"]):
                raise ValueError("draft and target tokenizers differ; speculative decoding "
                                 "needs one shared vocabulary")
        transport_cls = (CompiledGraphTransport if self.cfg.transport == "compiled_graph"
                         else ActorTransport)
        self.transport = transport_cls(self.draft, self.target)
        self.cost_model = None
        if eng_cfg.speculation.needs_cost_model:   # only adaptive policies need a profile
            self.cost_model = CostModel.from_dict(ray.get(self._fit_cost_model(eng_cfg.speculation)))
        self.engine = SpecEngine.remote(self.tokenizer, target_info["vocab_size"],
                                        self.draft is not None, eng_cfg.limits,
                                        eng_cfg.speculation, cost_model=self.cost_model,
                                        slo=eng_cfg.slo)
        if self.cost_model is not None:
            self._persist_learned()
        self.serving = AsyncSpecEngine(self.engine, self.transport.execute,
                                       max_queued=self.cfg.max_queued_requests,
                                       pipeline=self.cfg.pipeline)
        self.model_name = self.cfg.model_name
        self.created = int(time.time())
        self.telemetry = _telemetry(self.serving, self.cfg)

    # -- cost model -------------------------------------------------------------------------
    def _persist_learned(self) -> None:
        """Resume and keep saving what the policies learn, beside the cached profile."""
        from specserve_ray.policy.profile import attach_persistence, cost_model_key

        eng = self.cfg.engine
        if eng.speculation.synthetic_acceptance_rate is None:
            attach_persistence(self.engine, None, cost_model_key(
                eng.target.path, eng.draft.path if eng.draft else None, eng.target.dtype,
                eng.target.device))

    def _fit_cost_model(self, spec: SpeculationConfig):
        """An ObjectRef to the fitted CostModel's dict (cached on disk by the task)."""
        from specserve_ray.policy.profile import cost_model_key

        eng = self.cfg.engine
        key = cost_model_key(eng.target.path, eng.draft.path if eng.draft else None,
                             eng.target.dtype, eng.target.device)
        return _fit_cost_model_task.remote(
            self.target, self.draft, spec.model_dump(), eng.limits.model_dump(), key)

    # -- runtime knobs ----------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        """Change speculation (policy included) and batch limits without restarting.

        Switching to an adaptive policy for the first time profiles the workers once
        (bounded by profile_budget_s, cached on disk); requests keep flowing meanwhile.
        """
        user_config = dict(user_config or {})
        spec_keys = ("num_speculative_tokens", "policy", "profile_budget_s")
        updates = {k: user_config.pop(k) for k in spec_keys if k in user_config}
        if updates:
            spec = SpeculationConfig(**{**self.engine.speculation.model_dump(), **updates})
            if spec.needs_cost_model and self.cost_model is None:
                # Pause the step loop: profiling shares the workers' models and slots.
                async with self.serving.paused():
                    self.cost_model = CostModel.from_dict(await self._fit_cost_model(spec))
                self.engine.cost_model = self.cost_model
                self._persist_learned()
            self.engine.speculation = spec
        if "max_num_seqs" in user_config:
            value = int(user_config.pop("max_num_seqs"))
            cap = self.cfg.engine.limits.max_num_seqs
            if not 1 <= value <= cap:
                raise ValueError(f"max_num_seqs must be in [1, {cap}] (the cache slots)")
            self.engine.limits = self.engine.limits.model_copy(update={"max_num_seqs": value})
        if "max_queued_requests" in user_config:
            self.serving.max_queued = int(user_config.pop("max_queued_requests"))
        if "pipeline" in user_config:
            value = user_config.pop("pipeline")
            if not isinstance(value, bool):
                raise ValueError(f"pipeline must be true or false, got {value!r}")
            self.serving.pipeline = value
        if "slo" in user_config:
            # Same shape as engine.slo in the app config; replaces the classes between
            # steps (running requests keep the class objects they resolved on arrival).
            self.engine.slo = SloConfig(**user_config.pop("slo"))
        if user_config:
            raise ValueError(f"unknown user_config keys: {sorted(user_config)}")

    async def check_health(self) -> None:
        self.telemetry.start()     # no-op once running (started here if __init__ had no loop)
        await asyncio.wait_for(self.target.ready.remote(), timeout=30)
        if self.draft is not None:
            await asyncio.wait_for(self.draft.ready.remote(), timeout=30)

    def __del__(self):
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.teardown()

    # -- Python handle API ------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], stream: bool = False,
                       request_id: str | None = None, num_speculative_tokens: int | None = None,
                       slo_class: str | None = None, **sampling: Any):
        """Generate a completion for `prompt` (text or token ids).

        Sampling keywords are those of `SamplingParams` (max_tokens, temperature, top_p,
        top_k, seed, stop, ignore_eos); `slo_class` names a configured latency class
        (None = the default one). Returns a dict with text, token_ids, finish_reason,
        prompt_tokens, completion_tokens and speculation. With `stream=True` (call through
        `handle.options(stream=True)`) it yields one dict per step with the new text and
        token ids instead.
        """
        params = SamplingParams(**sampling)
        if stream:
            return self._stream_dicts(prompt, params, request_id, num_speculative_tokens,
                                      slo_class)
        return await self.serving.generate(prompt, params, request_id, num_speculative_tokens,
                                           slo_class)

    async def _stream_dicts(self, prompt, params, request_id, k, slo_class):
        async for out in self.serving.generate_stream(prompt, params, request_id, k, slo_class):
            yield {"request_id": out.request_id, "text": out.new_text,
                   "token_ids": out.new_token_ids, "finished": out.finished,
                   "finish_reason": out.finish_reason, "prompt_tokens": out.num_prompt_tokens,
                   "completion_tokens": out.num_output_tokens,
                   "speculation": out.spec.summary()}

    async def stats(self) -> dict:
        return self.serving.stats()

    async def metrics_snapshot(self) -> dict:
        """The exported metrics as totals since start, current bounds, controller state."""
        return self.telemetry.snapshot()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook (deployments/autoscaling.py reads them)."""
        return self.telemetry.autoscaling_stats()

    async def worker_stats(self) -> dict:
        """Per-actor forward counts and live sequences (ordinary calls beside the graph)."""
        out = {"target": await self.target.forward_stats.remote()}
        out["draft"] = (await self.draft.forward_stats.remote() if self.draft is not None
                        else {"forward_calls": 0, "forward_seconds": 0.0, "num_seqs": 0})
        return out

    # -- HTTP: OpenAI-compatible -------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": self.created, "owned_by": "specserve-ray",
                                            "max_model_len": self.cfg.engine.limits.max_model_len}]}

    @api.get("/v1/stats")
    async def http_stats(self) -> dict:
        return self.serving.stats()

    def _check_model(self, body: oai._Common) -> None:
        if body.model is not None and body.model != self.model_name:
            raise RequestError(f"model {body.model!r} is not served here; "
                               f"available: {self.model_name!r}")

    @api.post("/v1/completions")
    async def completions(self, body: oai.CompletionRequest):
        try:
            self._check_model(body)
            params = body.sampling_params(default_max_tokens=16)
            prompt = body.prompt_input()
            if body.stream:
                return await self._sse(prompt, params, body, chat=False)
            result = await self.serving.generate(prompt, params, None, body.num_speculative_tokens,
                                                 body.slo_class)
            return oai.completion_response(oai.new_id("cmpl"), self.model_name, result)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return self._log_and_respond(exc)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: oai.ChatCompletionRequest):
        try:
            self._check_model(body)
            params = body.sampling_params(
                default_max_tokens=min(256, self.cfg.engine.limits.max_tokens))
            prompt = oai.render_chat(self.tokenizer, body.messages, self.cfg.chat_template)
            if body.stream:
                return await self._sse(prompt, params, body, chat=True)
            result = await self.serving.generate(prompt, params, None, body.num_speculative_tokens,
                                                 body.slo_class)
            return oai.chat_response(oai.new_id("chatcmpl"), self.model_name, result)
        except Exception as exc:  # noqa: BLE001
            return self._log_and_respond(exc)

    def _log_and_respond(self, exc: BaseException) -> JSONResponse:
        if _status_for(exc) >= 500 and not isinstance(exc, OverloadedError):
            log.exception("request failed")
        return _error_response(exc)

    async def _sse(self, prompt, params: SamplingParams, body: oai._Common, chat: bool):
        rid = oai.new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        stream = self.serving.generate_stream(prompt, params, None, body.num_speculative_tokens,
                                              body.slo_class)
        # Pull the first delta before answering 200, so admission errors (400/503) are
        # still proper status codes rather than errors inside an event stream.
        first = await stream.__anext__()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        model = self.model_name

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            last = None
            try:
                if chat:
                    yield event(oai.chat_chunk(rid, model, created, {"role": "assistant",
                                                                     "content": ""}, None))
                out = first
                while True:
                    last = out
                    if out.new_text or out.finished:
                        if chat:
                            delta = {"content": out.new_text} if out.new_text else {}
                            yield event(oai.chat_chunk(rid, model, created, delta,
                                                       out.finish_reason if out.finished else None))
                        else:
                            yield event(oai.completion_chunk(rid, model, created, out.new_text,
                                                             out.finish_reason if out.finished else None))
                    if out.finished:
                        break
                    out = await stream.__anext__()
                if include_usage and last is not None:
                    yield event(oai.usage_chunk(rid, model, created,
                                                "chat.completion.chunk" if chat else "text_completion",
                                                last.num_prompt_tokens, last.num_output_tokens,
                                                last.spec.summary()))
                yield "data: [DONE]\n\n"
            except (StepFailed, OverloadedError, RequestError) as exc:
                yield event(oai.error_body(_message(exc), _status_for(exc)))
                yield "data: [DONE]\n\n"
            finally:
                await stream.aclose()   # a disconnect lands here: abort + free caches

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- gRPC (through Serve's gRPC proxy) ----------------------------------------------------
    def _grpc_args(self, request):
        from deployments.proto import specserve_pb2 as pb

        sampling = {"max_tokens": request.max_tokens or 64, "temperature": request.temperature,
                    "top_p": request.top_p or 1.0, "top_k": request.top_k,
                    "stop": list(request.stop), "ignore_eos": request.ignore_eos}
        if request.HasField("seed"):
            sampling["seed"] = request.seed
        k = request.num_speculative_tokens if request.HasField("num_speculative_tokens") else None
        # proto3 strings cannot be unset: empty means the default class.
        return (pb, SamplingParams(**sampling), k, (request.request_id or None),
                request.slo_class or None)

    @staticmethod
    def _grpc_error(grpc_context, exc: BaseException) -> None:
        import grpc

        code = {400: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}.get(
            _status_for(exc), grpc.StatusCode.INTERNAL)
        grpc_context.set_code(code)
        grpc_context.set_details(_message(exc))

    @staticmethod
    def _spec_pb(pb, summary: dict):
        return pb.SpeculationSummary(**summary)

    async def Generate(self, request, grpc_context=None):
        from deployments.proto import specserve_pb2 as pb

        try:
            pb, params, k, rid, slo_class = self._grpc_args(request)
            r = await self.serving.generate(request.prompt or "", params, rid, k, slo_class)
            return pb.GenerateResponse(
                request_id=r["request_id"], text=r["text"], token_ids=r["token_ids"],
                finished=True, finish_reason=r["finish_reason"], prompt_tokens=r["prompt_tokens"],
                completion_tokens=r["completion_tokens"],
                speculation=self._spec_pb(pb, r["speculation"]))
        except Exception as exc:  # noqa: BLE001
            if grpc_context is None:
                raise
            self._grpc_error(grpc_context, exc)
            return pb.GenerateResponse()

    async def GenerateStream(self, request, grpc_context=None):
        from deployments.proto import specserve_pb2 as pb

        try:
            pb, params, k, rid, slo_class = self._grpc_args(request)
            async for out in self.serving.generate_stream(request.prompt or "", params, rid, k,
                                                          slo_class):
                yield pb.GenerateResponse(
                    request_id=out.request_id, text=out.new_text, token_ids=out.new_token_ids,
                    finished=out.finished, finish_reason=out.finish_reason or "",
                    prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                    speculation=self._spec_pb(pb, out.spec.summary()))
        except Exception as exc:  # noqa: BLE001
            if grpc_context is None:
                raise
            self._grpc_error(grpc_context, exc)
