"""From pydantic's findings to OpenAI's error fields, and what each front door may send.

Every refusal becomes one RequestError with a message a person can act on, `param` naming
the field as the client wrote it (`messages[0].content[1].type`) and `code` saying why:

  invalid_type                 a value of the wrong JSON type ("stream": "yes", 1.5 tokens)
  invalid_value                the right type out of range or malformed (top_p 0, NaN)
  unsupported_parameter        a known OpenAI field this server does not implement
  unknown_parameter            a field OpenAI does not define (nor this server's extras)
  missing_required_parameter   a required field is absent
  invalid_json                 the body does not parse
"""
from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError

from specserve_ray.api.inputs import check_prompt, check_text, kind_of
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.errors import RequestError, UnsupportedParameter

# At most this many findings are spelled out in one message.
_MAX_FINDINGS = 3


def param_name(loc) -> str | None:
    """`("body", "messages", 0, "content")` -> `messages[0].content`."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _finding(err: dict) -> tuple[str, str | None, str]:
    """One pydantic error dict -> (message, param, code)."""
    loc_param = param_name(err.get("loc", ()))
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, RequestError):
        param = cause.param or loc_param
        message = str(cause)
        if param and param not in message:
            message = f"{param}: {message}"
        return message, param, cause.code or "invalid_value"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return (f"Unrecognized request argument supplied: {loc_param}", loc_param,
                "unknown_parameter")
    if kind == "missing":
        return f"Missing required parameter: '{loc_param}'", loc_param, "missing_required_parameter"
    if kind == "json_invalid":
        detail = ctx.get("error", "")
        return (f"invalid request: the body is not valid JSON ({detail})", None, "invalid_json")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        got = kind_of(err.get("input"))
        message = f"{msg}, got {got}"
        return (f"{loc_param}: {message}" if loc_param else message), loc_param, "invalid_type"
    if loc_param and loc_param not in msg:
        msg = f"{loc_param}: {msg}"
    return msg, loc_param, "invalid_value"


def request_error(errors: ValidationError | list[dict]) -> RequestError:
    """All of a validation's findings as one RequestError; param/code of the first one."""
    found = errors.errors() if isinstance(errors, ValidationError) else list(errors)
    findings = [_finding(e) for e in found] or [("invalid request", None, "invalid_value")]
    messages = [m for m, _, _ in findings[:_MAX_FINDINGS]]
    if len(findings) > _MAX_FINDINGS:
        messages.append(f"and {len(findings) - _MAX_FINDINGS} more")
    _, param, code = findings[0]
    return RequestError("; ".join(messages), param, code)


def sampling_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams from keywords, any refusal as a RequestError (handle, gRPC, HTTP)."""
    try:
        return SamplingParams(**kwargs)
    except ValidationError as exc:
        raise request_error(exc) from None


def handle_call(prompt, num_speculative_tokens, slo_class, sampling: dict):
    """The checks of the DeploymentHandle's `generate` (the same as HTTP's):
    -> (prompt, SamplingParams, num_speculative_tokens, slo_class)."""
    prompt = check_prompt(prompt)
    if num_speculative_tokens is not None and (
            type(num_speculative_tokens) is not int or not 0 <= num_speculative_tokens <= 16):
        raise RequestError("num_speculative_tokens must be an integer in [0, 16]",
                           "num_speculative_tokens", "invalid_value")
    if slo_class is not None:
        check_text(slo_class, "slo_class")
    return prompt, sampling_params(**sampling), num_speculative_tokens, slo_class


# -- known OpenAI fields that would change the answer -------------------------------------------
def _none(v) -> bool:
    return v is None


def _none_or_empty(v) -> bool:
    return v is None or v == [] or v == {}


def _none_or(*neutral) -> Callable[[Any], bool]:
    # `type(v) is type(n)` so that True never passes for 1, nor 0 for False.
    return lambda v: v is None or any(type(v) is type(n) and v == n for n in neutral)


# field -> whether a value changes nothing (it is then dropped) and what the field asks for.
UnsupportedTable = dict[str, tuple[Callable[[Any], bool], str]]

_SHARED: UnsupportedTable = {
    "logit_bias": (_none_or_empty, "logit_bias is not supported"),
    "min_tokens": (_none_or(0), "min_tokens is not supported (use ignore_eos with max_tokens)"),
}

COMPLETION_UNSUPPORTED: UnsupportedTable = {
    **_SHARED,
    "logprobs": (_none, "logprobs are not supported"),
    "echo": (_none_or(False), "echo is not supported"),
    "suffix": (_none_or(""), "suffix (insertion) is not supported"),
    "best_of": (_none_or(1), "best_of > 1 is not supported"),
}

CHAT_UNSUPPORTED: UnsupportedTable = {
    **_SHARED,
    "logprobs": (_none_or(False), "logprobs are not supported"),
    "top_logprobs": (_none, "top_logprobs are not supported"),
    "tools": (_none_or_empty, "tools (function calling) are not supported"),
    "tool_choice": (_none_or("none"), "tool_choice is not supported (no tool calling)"),
    "functions": (_none_or_empty, "functions (function calling) are not supported"),
    "function_call": (_none_or("none"), "function_call is not supported (no tool calling)"),
    "parallel_tool_calls": (_none, "parallel_tool_calls is not supported (no tool calling)"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "response_format other than {\"type\": \"text\"} is not supported "
                        "(no JSON mode or structured output)"),
    "audio": (_none, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "prediction": (_none, "predicted outputs are not supported"),
    "reasoning_effort": (_none, "reasoning_effort is not supported by this model"),
    "web_search_options": (_none, "web search is not supported"),
}


def drop_unsupported(data: dict, table: UnsupportedTable) -> dict:
    """`data` without the table's fields that change nothing; UnsupportedParameter for the
    first one that would change the answer."""
    out = dict(data)
    for name, (neutral, why) in table.items():
        if name in out:
            if not neutral(out[name]):
                raise UnsupportedParameter(name, f"{why}; remove {name!r} from the request")
            del out[name]
    return out
