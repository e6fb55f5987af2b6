"""The OpenAI-compatible HTTP front door: FastAPI routes, server-sent events, the guard.

    request ──> FrontDoorGuard (ASGI, before any body byte is read or parsed)
                  API key (all paths but /health)  -> 401
                  queue already full (generate paths)  -> 429 + Retry-After
                  Content-Length, then bytes as they arrive > max_body_bytes -> 413
            ──> FastAPI: JSON -> openai.*Request models -> FrontDoor.stream / generate

The routes are plain functions over the replica installed with `install(router)` (one
replica per process): they read `router.front` (the FrontDoor) and a few settings, and
answer every failure through specserve_ray/api/error_map.py. (Plain functions rather than
Serve's class-based routes: those depend on the module that defines the class being
imported before Serve unpickles the app.)
"""
from __future__ import annotations

import json
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specserve_ray.api import openai as oai
from specserve_ray.api.auth import AuthError
from specserve_ray.api.error_map import ErrorReply, classify, http_headers, openai_body
from specserve_ray.api.validation import request_error
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.errors import PayloadTooLargeError, RequestError

api = FastAPI(title="SpecServe-Ray", docs_url=None, redoc_url=None)
OPEN_PATHS = frozenset({"/health"})
GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
_router = None   # this process's SpecRouter replica, set by `install`


def install(router) -> None:
    """Serve this replica (it has .front, .cfg, .model_name, .created, .stats_dict())."""
    global _router
    _router = router


async def current_router():
    # async: FastAPI runs a plain-function dependency on a thread, a hop per request.
    if _router is None:
        raise RuntimeError("no router installed in this process")
    return _router


def error_response(reply: ErrorReply) -> JSONResponse:
    return JSONResponse(openai_body(reply), status_code=reply.status,
                        headers=http_headers(reply))


class _BodyTooLarge(Exception):
    pass


class FrontDoorGuard:
    """Pure ASGI middleware: API key and body size, decided before the body is parsed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        front = getattr(_router, "front", None)
        if scope["type"] != "http" or front is None:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        headers = dict(scope.get("headers") or ())
        if path not in OPEN_PATHS:
            try:
                front.auth.check_header(headers.get(b"authorization"))
            except AuthError as exc:
                return await error_response(classify(exc))(scope, receive, send)
        if path in GENERATE_PATHS and scope.get("method") == "POST":
            overloaded = front.refuse_early()
            if overloaded is not None:     # cheap: no body read, parsed or tokenized
                return await error_response(classify(overloaded))(scope, receive, send)
        limit = front.cfg.max_body_bytes
        too_large = PayloadTooLargeError(f"request body exceeds {limit} bytes "
                                         "(front.max_body_bytes)")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if not length.isdigit():
                too_large = RequestError("invalid Content-Length header")
            return await error_response(classify(too_large))(scope, receive, send)

        received, refused, started = 0, False, False

        async def counted_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:      # chunked or lying Content-Length
                    refused = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return                    # the app's answer to the cut body is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await error_response(classify(too_large))(scope, receive, send)


api.add_middleware(FrontDoorGuard)


@api.exception_handler(RequestValidationError)
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(classify(request_error(exc.errors())))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # e.g. a body that is not valid UTF-8 (400), an unknown path (404), a wrong method (405).
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    err_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(ErrorReply(exc.status_code, "INVALID_ARGUMENT",
                                     f"invalid request: {detail}", err_type, exc.status_code))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@api.get("/health")
async def health():
    """Readiness (load balancers): 503 while the target worker is recovering, while
    draining, or when the replica cannot recover (liveness is Serve's check_health)."""
    serving = getattr(_router, "serving", None)
    ready, why = serving.readiness() if serving is not None else (True, "ok")
    if ready:
        return {"status": "ok"}
    return JSONResponse({"status": "unavailable", "reason": why}, status_code=503,
                        headers={"Retry-After": "5"})


@api.get("/v1/models")
async def models(router=Depends(current_router)) -> dict:
    return {"object": "list", "data": [{"id": router.model_name, "object": "model",
                                        "created": router.created, "owned_by": "specserve-ray",
                                        "max_model_len": router.cfg.engine.limits.max_model_len}]}


@api.get("/v1/stats")
async def http_stats(router=Depends(current_router)) -> dict:
    return router.stats_dict()


def _check_model(router, body) -> None:
    if body.model is not None and body.model != router.model_name:
        raise RequestError(f"model {body.model!r} is not served here; "
                           f"available: {router.model_name!r}", "model", "model_not_found")


@api.post("/v1/completions")
async def completions(body: oai.CompletionRequest, router=Depends(current_router)):
    try:
        _check_model(router, body)
        params = body.sampling_params(default_max_tokens=16)
        prompt = body.prompt_input()
        if body.stream:
            return await _sse(router, prompt, params, body, chat=False)
        result = await router.front.generate(prompt, params, None, body.num_speculative_tokens,
                                             body.slo_class)
        return oai.completion_response(oai.new_id("cmpl"), router.model_name, result)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
        return error_response(router.front.reply_for(exc, "http"))


@api.post("/v1/chat/completions")
async def chat_completions(body: oai.ChatCompletionRequest, router=Depends(current_router)):
    try:
        _check_model(router, body)
        params = body.sampling_params(
            default_max_tokens=min(256, router.cfg.engine.limits.max_tokens))
        prompt = await router.front.render_chat(body.messages, router.cfg.chat_template)
        if body.stream:
            return await _sse(router, prompt, params, body, chat=True)
        result = await router.front.generate(prompt, params, None, body.num_speculative_tokens,
                                             body.slo_class)
        return oai.chat_response(oai.new_id("chatcmpl"), router.model_name, result)
    except Exception as exc:  # noqa: BLE001
        return error_response(router.front.reply_for(exc, "http"))


async def _sse(router, prompt, params: SamplingParams, body, chat: bool):
    rid = oai.new_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    front, model = router.front, router.model_name
    stream = front.stream(prompt, params, None, body.num_speculative_tokens, body.slo_class)
    # Pull the first delta before answering 200, so admission errors (400/429) are still
    # proper status codes rather than errors inside an event stream.
    try:
        first = await stream.__anext__()
    except BaseException:
        await stream.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    obj = "chat.completion.chunk" if chat else "text_completion"

    async def events():
        last = None
        try:
            if chat:
                yield _event(oai.chat_chunk(rid, model, created, {"role": "assistant",
                                                                  "content": ""}, None))
            out = first
            while True:
                last = out
                if out.new_text or out.finished:
                    reason = out.finish_reason if out.finished else None
                    if chat:
                        delta = {"content": out.new_text} if out.new_text else {}
                        yield _event(oai.chat_chunk(rid, model, created, delta, reason))
                    else:
                        yield _event(oai.completion_chunk(rid, model, created, out.new_text,
                                                          reason))
                if out.finished:
                    break
                out = await stream.__anext__()
            if include_usage and last is not None:
                yield _event(oai.usage_chunk(rid, model, created, obj, last.num_prompt_tokens,
                                             last.num_output_tokens, last.spec.summary()))
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - the status is sent: report in-stream
            yield _event(openai_body(front.reply_for(exc, "http stream")))
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()   # a disconnect lands here: abort + free caches

    return StreamingResponse(events(), media_type="text/event-stream")
