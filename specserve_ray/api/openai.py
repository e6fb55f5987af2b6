"""OpenAI-compatible request and response shapes (pure: no Ray, no HTTP server).

Requests are validated here and turned into SamplingParams; responses, stream chunks and
error bodies are built here, so the HTTP layer only moves bytes.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from specserve_ray.config import SamplingParams
from specserve_ray.errors import RequestError

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, description="Extra: top-k sampling (0 or -1 = off).")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = Field(False, description="Extra: generate exactly max_tokens.")
    slo_class: str | None = Field(None, description="Extra: the request's latency SLO class, "
                                  "one of engine.slo.classes (None = the default class).")
    num_speculative_tokens: int | None = Field(None, description="Extra: static k override.")
    drafter: str | None = Field(None, description="Extra: this request's drafter, 'model', "
                                "'ngram' or 'model+ngram' (None = the configured one).")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    echo: bool = False

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n = 1 is supported")
        return v

    def check_unsupported(self) -> None:
        if self.presence_penalty or self.frequency_penalty:
            raise RequestError("presence_penalty and frequency_penalty are not supported")
        if self.logprobs not in (None, False, 0):
            raise RequestError("logprobs are not supported")
        if self.echo:
            raise RequestError("echo is not supported")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        self.check_unsupported()
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                                  top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                                  stop=self.stop, ignore_eos=self.ignore_eos,
                                  drafter=self.drafter)
        except ValidationError as exc:
            raise RequestError(validation_message(exc)) from None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list):
            if p and all(isinstance(x, str) for x in p):
                if len(p) != 1:
                    raise RequestError("only one prompt per request is supported")
                return p[0]
            return list(p)
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(part.get("text", "") for part in self.content
                           if isinstance(part, dict) and part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling_params(default_max_tokens)


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def render_chat(tokenizer, messages: list[ChatMessage], template: str | None) -> str:
    convo = [{"role": m.role, "content": m.text()} for m in messages]
    chosen = template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(convo, chat_template=chosen, tokenize=False,
                                         add_generation_prompt=True)


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


def error_body(message: str, status: int, err_type: str | None = None) -> dict:
    if err_type is None:
        err_type = ("invalid_request_error" if 400 <= status < 500 and status != 429
                    else "rate_limit_error" if status == 429 else "server_error")
    return {"error": {"message": message, "type": err_type, "param": None, "code": status}}
