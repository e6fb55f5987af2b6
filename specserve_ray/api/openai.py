"""OpenAI-compatible request and response shapes (pure: no Ray, no HTTP server).

Requests are validated here, strictly, and turned into SamplingParams; responses, stream
chunks and error bodies are built here, so the HTTP layer only moves bytes. What a request
may contain (README "Request validation"): OpenAI's fields with OpenAI's types and ranges;
fields this server does not implement are refused unless set to a value that changes
nothing (api/validation.py lists them); fields that only label a request (`user`,
`metadata`, `store`...) are accepted and ignored; fields OpenAI does not define are refused.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Re-exported: the router renders chats and older callers import the template from here.
from specserve_ray.api.chat import DEFAULT_CHAT_TEMPLATE, parse_messages, render_chat  # noqa: F401
from specserve_ray.api.inputs import check_prompt, check_text
from specserve_ray.api.validation import (CHAT_UNSUPPORTED, COMPLETION_UNSUPPORTED,
                                          UnsupportedTable, drop_unsupported, request_error,
                                          sampling_params)
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.errors import RequestError, UnsupportedParameter

# Strict like OpenAI: "stream": "yes" is not true, 1.0 is not a token count, NaN is no number.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


_NULL_IS_DEFAULT = frozenset({"temperature", "top_p", "top_k", "n", "presence_penalty",
                              "frequency_penalty", "stream", "ignore_eos"})


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _STRICT
    UNSUPPORTED: ClassVar[UnsupportedTable] = {}   # the endpoint's refused OpenAI fields

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, description="Extra: top-k sampling (0 or -1 = off).")
    seed: int | None = None
    stop: Any = Field(None, description="A string or a list of strings (SamplingParams "
                      "checks them).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = Field(False, description="Extra: generate exactly max_tokens.")
    slo_class: str | None = Field(None, description="Extra: the request's latency SLO class, "
                                  "one of engine.slo.classes (None = the default class).")
    num_speculative_tokens: int | None = Field(None, ge=0, le=16,
                                               description="Extra: static k override.")
    drafter: str | None = Field(None, description="Extra: this request's drafter, 'model', "
                                "'ngram' or 'model+ngram' (None = the configured one).")
    # Tolerated: they label the request and change nothing the client gets back.
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            data = drop_unsupported(data, cls.UNSUPPORTED)
            # OpenAI's schema makes these nullable: null means "the default".
            data = {k: v for k, v in data.items() if not (v is None and k in _NULL_IS_DEFAULT)}
        return data

    @field_validator("model", "slo_class", "user")
    @classmethod
    def _text(cls, v: str | None, info) -> str | None:
        return None if v is None else check_text(v, info.field_name)

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v > 1:
            raise UnsupportedParameter("n", "n > 1 is not supported: one choice per request")
        if v < 1:
            raise RequestError(f"n must be 1, got {v}", "n", "invalid_value")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v: float, info) -> float:
        if not -2.0 <= v <= 2.0:
            raise RequestError(f"{info.field_name} must be in [-2, 2], got {v}",
                               info.field_name, "invalid_value")
        if v != 0.0:
            raise UnsupportedParameter(info.field_name, f"{info.field_name} is not supported "
                                       "(only 0)")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options are only allowed when stream is true",
                               "stream_options", "invalid_value")
        return self

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return sampling_params(max_tokens=max_tokens, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                               stop=self.stop, ignore_eos=self.ignore_eos,
                               drafter=self.drafter)


class CompletionRequest(_Common):
    UNSUPPORTED: ClassVar[UnsupportedTable] = COMPLETION_UNSUPPORTED
    prompt: Any = Field(description="A string, a list of one string, or a list of token ids.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return check_prompt(v)

    def prompt_input(self) -> str | list[int]:
        return self.prompt


class ChatCompletionRequest(_Common):
    UNSUPPORTED: ClassVar[UnsupportedTable] = CHAT_UNSUPPORTED
    messages: Any = Field(description="The conversation: text messages (api/chat.py).")
    max_completion_tokens: int | None = None
    # Tolerated: request labels and storage/tier hints with nothing to do here.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v) -> list[dict]:
        return parse_messages(v)

    @model_validator(mode="after")
    def _one_token_limit(self):
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise RequestError("max_tokens and max_completion_tokens differ; set one",
                               "max_completion_tokens", "invalid_value")
        return self

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            default_max_tokens = self.max_completion_tokens
        return super().sampling_params(default_max_tokens)


def parse_request(model: type[_Common], body) -> _Common:
    """Validate a decoded JSON body; every refusal as one RequestError (param, code)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise request_error(exc) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, result: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": result["text"], "logprobs": None,
                         "finish_reason": result["finish_reason"]}],
            "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
            "speculation": result["speculation"]}


def chat_response(rid: str, model: str, result: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "logprobs": None, "finish_reason": result["finish_reason"]}],
            "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
            "speculation": result["speculation"]}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int,
                completion_tokens: int, speculation: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens), "speculation": speculation}


def error_body(message: str, status: int, err_type: str | None = None,
               param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape; `param` names the field at fault, `code` a short reason."""
    if err_type is None:
        err_type = ("invalid_request_error" if 400 <= status < 500 and status != 429
                    else "rate_limit_error" if status == 429 else "server_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_fields(exc: BaseException) -> dict:
    """`param` and `code` of a RequestError (none for other errors), for error_body."""
    return {"param": getattr(exc, "param", None), "code": getattr(exc, "code", None)}


def validation_message(exc) -> str:
    """A pydantic ValidationError as one message (kept for callers outside the API)."""
    return str(request_error(exc))
