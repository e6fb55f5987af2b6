"""Hostile and unsupported requests, as one table shared by the pure validation tests and the
served suite (tests/test_hostile_inputs.py).

Each case is refused with a 4xx whose body names the field (`param`) and the reason
(`code`). `layer` says who refuses it: "model" = the request models (api/), checked
without Ray; "admission" = the front door's configured limits (api/front.py) or the
scheduler, which know the vocabulary and the context length; "http" = the body does not
even decode as JSON (only the served suite sends those).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

# The served app's limits (tests/test_hostile_inputs.py): context 256, max_tokens 200.
CONTEXT = 256


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    path: str                # "completions" or "chat/completions"
    body: dict | bytes
    param: str | None        # expected error.param (None: not asserted)
    code: str | None         # expected error.code (None: not asserted)
    needle: str              # a piece of the message a person would look for
    layer: str = "model"
    statuses: tuple[int, ...] = (400,)

    def raw(self) -> bytes:
        # ensure_ascii keeps lone surrogates as \ud800 escapes and NaN as a bare token,
        # exactly what a hostile client can put on the wire.
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


def comp(**fields) -> dict:
    return {"prompt": "def f(x):", "max_tokens": 4, **fields}


def chat(*messages, **fields) -> dict:
    return {"messages": list(messages) or [{"role": "user", "content": "hi"}], "max_tokens": 4,
            **fields}


def user(content) -> dict:
    return {"role": "user", "content": content}


C, CH = "completions", "chat/completions"
T, R, S, E, U, M, P = ("types", "ranges", "sizes", "encodings", "unsupported", "chat",
                       "token_ids")

CASES = [
    # -- wrong types -------------------------------------------------------------------------
    Case("stream_yes", T, C, comp(stream="yes"), "stream", "invalid_type", "valid boolean"),
    Case("max_tokens_float", T, C, comp(max_tokens=1.5), "max_tokens", "invalid_type",
         "valid integer"),
    Case("max_tokens_float_whole", T, C, comp(max_tokens=4.0), "max_tokens", "invalid_type",
         "valid integer"),
    Case("max_tokens_bool", T, C, comp(max_tokens=True), "max_tokens", "invalid_type",
         "boolean"),
    Case("temperature_string", T, C, comp(temperature="0.7"), "temperature", "invalid_type",
         "valid number"),
    Case("prompt_number", T, C, comp(prompt=12.5), "prompt", "invalid_type", "prompt must be"),
    Case("stop_number", T, C, comp(stop=[1]), "stop[0]", "invalid_type", "must be a string"),
    Case("seed_string", T, C, comp(seed="42"), "seed", "invalid_type", "valid integer"),
    Case("ignore_eos_int", T, C, comp(ignore_eos=1), "ignore_eos", "invalid_type", "boolean"),
    Case("messages_string", T, CH, {"messages": "hi"}, "messages", "invalid_type",
         "list of messages"),
    Case("body_not_object", T, C, b"[1, 2, 3]", None, "invalid_type", "dictionary"),
    Case("stream_options_type", T, C, comp(stream=True, stream_options={"include_usage": "y"}),
         "stream_options.include_usage", "invalid_type", "boolean"),
    # -- out-of-range numbers ----------------------------------------------------------------
    Case("temperature_negative", R, C, comp(temperature=-1), "temperature", "invalid_value",
         "temperature must be >= 0"),
    Case("temperature_above_2", R, C, comp(temperature=2.5), "temperature", "invalid_value",
         "<= 2"),
    Case("temperature_nan", R, C, b'{"prompt": "x", "temperature": NaN}', "temperature",
         "invalid_value", "finite number"),
    Case("top_p_infinity", R, C, b'{"prompt": "x", "top_p": Infinity}', "top_p",
         "invalid_value", "finite number"),
    Case("top_p_overflow_to_inf", R, C, b'{"prompt": "x", "top_p": 1e400}', "top_p",
         "invalid_value", "finite number"),
    Case("top_p_zero", R, C, comp(top_p=0), "top_p", "invalid_value", "top_p must be in"),
    Case("seed_2_64", R, C, comp(seed=2**64), "seed", "invalid_value", "[-2**63, 2**64)"),
    Case("seed_below_int64", R, C, comp(seed=-2**63 - 1), "seed", "invalid_value",
         "[-2**63, 2**64)"),
    Case("seed_huge", R, C, comp(seed=10**40), "seed", "invalid_value", "[-2**63, 2**64)"),
    Case("top_k_negative", R, C, comp(top_k=-2), "top_k", "invalid_value", "top_k must be"),
    Case("max_tokens_zero", R, C, comp(max_tokens=0), "max_tokens", "invalid_value",
         "max_tokens must be > 0"),
    Case("max_tokens_2_63", R, C, comp(max_tokens=2**63), "max_tokens", "invalid_value",
         "exceeds the limit",
         layer="admission"),
    Case("penalty_out_of_range", R, C, comp(frequency_penalty=-3), "frequency_penalty",
         "invalid_value", "[-2, 2]"),
    Case("n_zero", R, C, comp(n=0), "n", "invalid_value", "n must be 1"),
    Case("k_override_99", R, C, comp(num_speculative_tokens=99), "num_speculative_tokens",
         "invalid_value", "less than or equal to 16"),
    Case("int_5000_digits", R, C, b'{"prompt": "x", "top_k": ' + b"9" * 5000 + b"}", None,
         None, "invalid request", layer="http"),
    # -- sizes -------------------------------------------------------------------------------
    Case("prompt_beyond_context", S, C, comp(prompt="x = 1\n" * 400), "prompt",
         "context_length_exceeded",
         "the context holds", layer="admission"),
    Case("token_prompt_beyond_context", S, C, comp(prompt=[17] * 300), "prompt",
         "context_length_exceeded",
         "the context holds", layer="admission"),
    Case("prompt_plus_max_tokens", S, C, comp(prompt=[17] * 200, max_tokens=100),
         "max_tokens", "context_length_exceeded",
         "exceeds the context length", layer="admission"),
    Case("max_tokens_huge", S, C, comp(max_tokens=100_000), "max_tokens", "invalid_value",
         "exceeds the limit",
         layer="admission"),
    Case("stop_list_17", S, C, comp(stop=[f"s{i}" for i in range(17)]), "stop",
         "invalid_value", "at most 16 stop strings", layer="admission"),
    Case("stop_string_300", S, C, comp(stop="x" * 300), "stop", "invalid_value",
         "at most 256 characters", layer="admission"),
    Case("stop_empty_string", S, C, comp(stop=[""]), "stop", "invalid_value", "non-empty"),
    Case("body_1mb_stop_list", S, C, comp(stop=["stop"] * 200_000), "stop", "invalid_value",
         "stop strings", layer="admission", statuses=(400, 413)),
    Case("messages_empty", S, CH, {"messages": []}, "messages", "invalid_value",
         "at least one message"),
    # -- encodings ---------------------------------------------------------------------------
    Case("invalid_utf8_bytes", E, C, b'{"prompt": "\xff\xfe bad", "max_tokens": 4}', None,
         None, "invalid request", layer="http"),
    Case("truncated_utf8", E, C, b'{"prompt": "caf\xc3", "max_tokens": 4}', None, None,
         "invalid request", layer="http"),
    Case("lone_high_surrogate", E, C, comp(prompt="a\ud800b"), "prompt", "invalid_value",
         "lone UTF-16 surrogate"),
    Case("lone_low_surrogate_chat", E, CH, chat(user("x\udc00")), "messages[0].content",
         "invalid_value", "surrogate"),
    Case("surrogate_in_stop", E, C, comp(stop=["\udfff"]), "stop[0]", "invalid_value",
         "surrogate"),
    Case("nul_in_prompt", E, C, comp(prompt="a\x00b"), "prompt", "invalid_value",
         "control character U+0000"),
    Case("escape_in_chat_part", E, CH, chat(user([{"type": "text", "text": "\x1b[31m"}])),
         "messages[0].content[0].text", "invalid_value", "control character U+001B"),
    Case("control_in_slo_class", E, C, comp(slo_class="batch\x07"), "slo_class",
         "invalid_value", "control character"),
    Case("surrogate_in_model", E, C, comp(model="m\ud834"), "model", "invalid_value",
         "surrogate"),
    # -- unsupported or unknown fields -------------------------------------------------------
    Case("tools", U, CH, chat(tools=[{"type": "function", "function": {"name": "f"}}]),
         "tools", "unsupported_parameter", "tools"),
    Case("tool_choice_auto", U, CH, chat(tool_choice="auto"), "tool_choice",
         "unsupported_parameter", "tool_choice"),
    Case("functions", U, CH, chat(functions=[{"name": "f"}]), "functions",
         "unsupported_parameter", "functions"),
    Case("response_format_json", U, CH, chat(response_format={"type": "json_object"}),
         "response_format", "unsupported_parameter", "response_format"),
    Case("logit_bias", U, C, comp(logit_bias={"17": 100}), "logit_bias",
         "unsupported_parameter", "logit_bias"),
    Case("logprobs_completions", U, C, comp(logprobs=2), "logprobs", "unsupported_parameter",
         "logprobs"),
    Case("logprobs_chat", U, CH, chat(logprobs=True), "logprobs", "unsupported_parameter",
         "logprobs"),
    Case("top_logprobs", U, CH, chat(top_logprobs=3), "top_logprobs",
         "unsupported_parameter", "top_logprobs"),
    Case("suffix", U, C, comp(suffix="return x"), "suffix", "unsupported_parameter",
         "suffix"),
    Case("best_of_3", U, C, comp(best_of=3), "best_of", "unsupported_parameter", "best_of"),
    Case("n_2", U, C, comp(n=2), "n", "unsupported_parameter", "n > 1"),
    Case("echo", U, C, comp(echo=True), "echo", "unsupported_parameter", "echo"),
    Case("min_tokens", U, C, comp(min_tokens=5), "min_tokens", "unsupported_parameter",
         "min_tokens"),
    Case("presence_penalty", U, C, comp(presence_penalty=0.5), "presence_penalty",
         "unsupported_parameter", "presence_penalty"),
    Case("modalities_audio", U, CH, chat(modalities=["text", "audio"]), "modalities",
         "unsupported_parameter", "modality"),
    Case("unknown_field", U, C, comp(temprature=0.5), "temprature", "unknown_parameter",
         "Unrecognized request argument supplied: temprature"),
    Case("unknown_vllm_field", U, C, comp(repetition_penalty=1.2), "repetition_penalty",
         "unknown_parameter", "Unrecognized"),
    Case("unknown_stream_option", U, C, comp(stream=True, stream_options={"x": True}),
         "stream_options.x", "unknown_parameter", "Unrecognized"),
    Case("stream_options_without_stream", U, C, comp(stream_options={"include_usage": True}),
         "stream_options", "invalid_value", "only allowed when stream is true"),
    # -- malformed chat content and roles ----------------------------------------------------
    Case("content_null", M, CH, chat(user(None)), "messages[0].content", "invalid_value",
         "is null"),
    Case("content_missing", M, CH, chat({"role": "user"}), "messages[0].content",
         "missing_required_parameter", "Missing required parameter"),
    Case("text_part_number", M, CH, chat(user([{"type": "text", "text": 5}])),
         "messages[0].content[0].text", "invalid_type", "must be a string"),
    Case("image_part", M, CH, chat(user([{"type": "text", "text": "what is this?"},
                                         {"type": "image_url",
                                          "image_url": {"url": "data:image/png;base64,AA"}}])),
         "messages[0].content[1].type", "unsupported_parameter", "text parts only"),
    Case("audio_part", M, CH, chat(user([{"type": "input_audio",
                                          "input_audio": {"data": "AA", "format": "wav"}}])),
         "messages[0].content[0].type", "unsupported_parameter", "input_audio"),
    Case("unknown_part_type", M, CH, chat(user([{"type": "video"}])),
         "messages[0].content[0].type", "invalid_value", "must be 'text'"),
    Case("unknown_role", M, CH, chat({"role": "wizard", "content": "x"}), "messages[0].role",
         "invalid_value", "must be one of"),
    Case("tool_role", M, CH, chat(user("hi"), {"role": "tool", "content": "42",
                                               "tool_call_id": "c1"}),
         "messages[1].role", "unsupported_parameter", "tool"),
    Case("assistant_tool_calls", M, CH, chat(user("hi"), {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "f", "arguments": "{}"}}]}),
         "messages[1].tool_calls", "unsupported_parameter", "tool calls"),
    Case("message_not_object", M, CH, chat("hello"), "messages[0]", "invalid_type",
         "must be an object"),
    Case("role_number", M, CH, chat({"role": 3, "content": "x"}), "messages[0].role",
         "invalid_type", "must be a string"),
    # -- token-id prompts --------------------------------------------------------------------
    Case("token_out_of_vocab", P, C, comp(prompt=[17, 999_999]), "prompt", "invalid_value",
         "token ids must be integers in [0, 4096)", layer="admission"),
    Case("token_negative", P, C, comp(prompt=[17, -1]), "prompt[1]", "invalid_value",
         "not a token id"),
    Case("token_2_63", P, C, comp(prompt=[2**63]), "prompt[0]", "invalid_value",
         "not a token id"),
    Case("token_nested_batch", P, C, comp(prompt=[[17, 18], [19]]), "prompt",
         "unsupported_parameter", "token-id lists"),
    Case("token_bools", P, C, comp(prompt=[True, 17]), "prompt[0]", "invalid_type",
         "boolean"),
    Case("token_floats", P, C, comp(prompt=[17, 1.5]), "prompt[1]", "invalid_type",
         "token ids are integers"),
    Case("token_mixed_nesting", P, C, comp(prompt=[17, [18]]), "prompt[1]", "invalid_type",
         "token ids are integers"),
    Case("prompt_empty_list", P, C, comp(prompt=[]), "prompt", "invalid_value",
         "prompt is empty"),
    Case("prompt_many_strings", P, C, comp(prompt=["a", "b"]), "prompt",
         "unsupported_parameter", "one prompt per request"),
]

# Requests at the edge that must be ANSWERED (200), not refused: caps and tolerated fields.
ACCEPTED = [
    ("top_k_2_63_capped", C, comp(top_k=2**63, temperature=0.8, seed=3)),
    ("top_k_minus_1", C, comp(top_k=-1)),
    ("tolerated_labels", CH, chat(user="u-1", metadata={"team": "a"}, store=False,
                                  service_tier="auto")),
    ("neutral_unsupported", CH, chat(tools=[], tool_choice="none", response_format={
        "type": "text"}, logprobs=False, n=1, presence_penalty=0, frequency_penalty=0.0,
        logit_bias={})),
    ("whitespace_controls", C, comp(prompt="def f(x):\n\treturn x\r\n\x0b\x0c")),
    ("text_parts", CH, chat(user([{"type": "text", "text": "a"},
                                  {"type": "text", "text": "b"}]))),
    ("token_ids", C, comp(prompt=[17, 18, 19])),
    ("control_in_stop", C, comp(stop=["\x00never", "\x1b"])),   # matched exactly
    ("one_string_list", C, comp(prompt=["def g():"], best_of=1, echo=False, suffix="")),
    ("nulls_mean_defaults", C, comp(temperature=None, top_p=None, n=None, stream=None,
                                    presence_penalty=None, frequency_penalty=None, seed=None,
                                    stop=None, max_tokens=None, logprobs=None, echo=None,
                                    best_of=None, suffix=None, logit_bias=None, user=None,
                                    stream_options=None)),
]
