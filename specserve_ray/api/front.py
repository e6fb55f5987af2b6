"""FrontDoor: the one serving object behind HTTP, gRPC and DeploymentHandle calls.

Everything a request passes before the step loop, in order:

    (HTTP: queue already full -> 429 before the body is read; `refuse_early`)  ->
    client request id checked (a label only)  ->  stop-list bounds  ->
    prompt: characters bounded, then tokenized on a worker thread (never on the event
    loop)  ->  prompt-token bound  ->  queue bounds (requests and tokens; refusal = 429
    with a Retry-After estimated from the measured drain rate)  ->  AsyncSpecEngine

Request ids: the engine only ever sees ids this object makes (a per-replica prefix and
a uuid), so a client-chosen id can never collide with or reach another request; the
client's id is echoed back as a label. The adapters (deployments/http_api.py,
deployments/grpc_api.py) only move bytes and call `reply_for` on failure.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from specserve_ray.admission import DrainMeter, QueueBounds, retry_after_s
from specserve_ray.api.auth import ApiKeyCheck
from specserve_ray.api.error_map import ErrorReply, classify
from specserve_ray.request_streams import collect_result
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.errors import OverloadedError, RequestError, UnavailableError
from specserve_ray.front_config import FrontDoorConfig

log = logging.getLogger("specserve_ray")

MAX_CLIENT_ID_CHARS = 128


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> RequestError:
    return RequestError(message, param, code)


class FrontDoor:
    def __init__(self, serving, tokenizer, cfg: FrontDoorConfig, max_queued_requests: int,
                 api_keys: list[str] | None = None, clock=time.monotonic):
        self.serving = serving              # AsyncSpecEngine
        self.tokenizer = tokenizer          # a private instance: used on the worker thread
        self.cfg = cfg
        self.auth = ApiKeyCheck(api_keys or [])
        self.clock = clock
        self.drain = DrainMeter()
        self.drain.start(clock())
        self.bounds = QueueBounds(max_queued_requests, cfg.max_queued_tokens)
        serving.max_queued = max_queued_requests   # the engine's own bound, kept equal
        self.refusals: dict[str, int] = {}
        self._id_prefix = f"srv-{uuid.uuid4().hex[:8]}-"
        # Longest vocabulary entry: no prompt of n tokens has more than n times as many
        # characters, so longer text is refused without tokenizing it.
        self._longest_token = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="specserve-tokenize")

    # -- limits and knobs --------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.serving.engine.limits.max_model_len

    @property
    def max_prompt_tokens(self) -> int:
        cap = self.max_model_len - 1
        return min(cap, self.cfg.max_prompt_tokens) if self.cfg.max_prompt_tokens else cap

    @property
    def max_prompt_chars(self) -> int:
        if self.cfg.max_prompt_chars is not None:
            return self.cfg.max_prompt_chars
        return self.max_prompt_tokens * self._longest_token

    def set_queue_bounds(self, max_queued_requests: int | None = None,
                         max_queued_tokens: int | None = None) -> None:
        requests = (self.bounds.max_queued_requests if max_queued_requests is None
                    else max_queued_requests)
        tokens = self.bounds.max_queued_tokens if max_queued_tokens is None else max_queued_tokens
        self.bounds = QueueBounds(requests, tokens)
        self.serving.max_queued = requests

    def retry_after(self) -> int:
        return retry_after_s(len(self.serving.engine.waiting), self.drain.rate(self.clock()),
                             self.cfg.retry_after_min_s, self.cfg.retry_after_max_s)

    # -- checks before the loop --------------------------------------------------------------
    @staticmethod
    def client_label(request_id) -> str | None:
        """The client's request id, validated; used only as a label echoed back."""
        if request_id is None or request_id == "":
            return None
        if not isinstance(request_id, str):
            raise _bad(f"request_id must be a string, got {type(request_id).__name__}",
                       "request_id", "invalid_type")
        if len(request_id) > MAX_CLIENT_ID_CHARS or not request_id.isprintable():
            raise _bad(f"request_id must be printable and at most {MAX_CLIENT_ID_CHARS} "
                       "characters", "request_id")
        return request_id

    def check_params(self, params: SamplingParams) -> None:
        if len(params.stop) > self.cfg.max_stop_strings:
            raise _bad(f"at most {self.cfg.max_stop_strings} stop strings, got "
                       f"{len(params.stop)}", "stop")
        longest = max((len(s) for s in params.stop), default=0)
        if longest > self.cfg.max_stop_chars:
            raise _bad(f"stop strings may have at most {self.cfg.max_stop_chars} characters, "
                       f"got {longest}", "stop")

    async def encode(self, prompt) -> list[int]:
        """Token ids of `prompt` (text or ids), bounded; tokenizing runs off the loop."""
        if isinstance(prompt, str):
            if not prompt:
                raise _bad("prompt is empty", "prompt")
            if len(prompt) > self.max_prompt_chars:
                raise _bad(f"prompt has {len(prompt)} characters, more than "
                           f"{self.max_prompt_tokens} tokens can hold (the context holds "
                           f"{self.max_model_len} tokens)", "prompt", "context_length_exceeded")
            ids = await self._off_loop(
                lambda: self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)     # the engine checks each id against the vocabulary
        else:
            raise _bad(f"prompt must be text or a list of token ids, got "
                       f"{type(prompt).__name__}", "prompt", "invalid_type")
        if len(ids) > self.max_prompt_tokens:
            raise _bad(f"prompt has {len(ids)} tokens; at most {self.max_prompt_tokens} are "
                       f"allowed (the context holds {self.max_model_len} including at least "
                       "one output token)", "prompt", "context_length_exceeded")
        return ids

    async def render_chat(self, messages, template: str | None) -> str:
        from specserve_ray.api.openai import render_chat

        chars = sum(len(m["content"]) for m in messages)   # api/chat.py's parsed turns
        if chars > self.max_prompt_chars:
            raise _bad(f"messages have {chars} characters, more than {self.max_prompt_tokens} "
                       "tokens can hold", "messages", "context_length_exceeded")
        return await self._off_loop(lambda: render_chat(self.tokenizer, messages, template))

    async def _off_loop(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn)

    def _queued_tokens(self, waiting) -> int:
        if self.bounds.max_queued_tokens is None:
            return 0                   # not bounded: not summed
        return sum(len(r.prompt_ids) + r.params.max_tokens for r in waiting)

    def refuse_early(self) -> OverloadedError | None:
        """The refusal for a request not yet read, when even the smallest one (one prompt
        token, one output token) would be refused: the HTTP guard answers 429 before the
        body is read, parsed or tokenized, so overload costs the replica little. A request
        that could fit is never refused here; `_admit` decides for it after tokenizing."""
        waiting = self.serving.engine.waiting
        refusal = self.bounds.check(len(waiting), self._queued_tokens(waiting), 2)
        if refusal is None:
            return None
        self._refuse(refusal.reason)
        return OverloadedError(refusal.message, self.retry_after())

    def _admit(self, prompt_ids: list[int], params: SamplingParams) -> None:
        waiting = self.serving.engine.waiting
        refusal = self.bounds.check(len(waiting), self._queued_tokens(waiting),
                                    len(prompt_ids) + params.max_tokens)
        if refusal is not None:
            self._refuse(refusal.reason)
            raise OverloadedError(refusal.message, self.retry_after())

    def _refuse(self, reason: str) -> None:
        """Count a refusal by reason: here (/v1/stats `admission`) and with the step
        loop's fault events (/v1/stats `faults`, Prometheus `fault_events{event=refused_*}`)."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        self.serving.faults.add("refused_" + reason)

    # -- requests ----------------------------------------------------------------------------
    async def stream(self, prompt, params: SamplingParams, request_id=None,
                     num_speculative_tokens: int | None = None,
                     slo_class: str | None = None, timeout_s: float | None = None) -> AsyncIterator:
        """Yield the engine's RequestOutput deltas, `request_id` set to the client's label
        (or the internal id when the client gave none). Closing early aborts the request."""
        label = self.client_label(request_id)
        self.check_params(params)
        prompt_ids = await self.encode(prompt)
        self._admit(prompt_ids, params)
        internal = self._id_prefix + uuid.uuid4().hex
        outputs = self.serving.generate_stream(prompt_ids, params, internal,
                                               num_speculative_tokens, slo_class, timeout_s)
        admitted = False
        try:
            async for out in outputs:
                admitted = True
                yield dataclasses.replace(out, request_id=label) if label else out
        finally:
            await outputs.aclose()     # abort + free both workers' slots if not finished
            if admitted:               # every admitted request leaving frees a slot
                self.drain.observe_finish(self.clock())

    async def generate(self, prompt, params: SamplingParams, request_id=None,
                       num_speculative_tokens: int | None = None,
                       slo_class: str | None = None, timeout_s: float | None = None) -> dict:
        # aclosing: a cancelled caller (client gone) aborts the request at once.
        async with contextlib.aclosing(self.stream(prompt, params, request_id,
                                                   num_speculative_tokens, slo_class,
                                                   timeout_s)) as stream:
            return await collect_result(stream)

    # -- failures ----------------------------------------------------------------------------
    def reply_for(self, exc: BaseException, door: str) -> ErrorReply:
        """The answer for `exc`; server faults are logged here under the reply's error id
        (the only place their details go)."""
        hint = self.retry_after() if isinstance(exc, (OverloadedError, UnavailableError)) else None
        reply = classify(exc, retry_after_s=hint)
        if reply.error_id is not None:
            log.error("%s request failed (error id %s)", door, reply.error_id, exc_info=exc)
        return reply

    def stats(self) -> dict:
        return {"refusals": dict(self.refusals),
                "drain_rate_per_s": round(self.drain.rate(self.clock()), 3),
                "retry_after_s": self.retry_after(),
                "max_queued_requests": self.bounds.max_queued_requests,
                "max_queued_tokens": self.bounds.max_queued_tokens}

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
