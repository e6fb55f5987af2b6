"""What text and prompts a request may carry, for every front door (pure: no pydantic, no I/O).

Text reaches the tokenizer, the chat template, stop matching and log lines, so it must be
a real Unicode string: a lone UTF-16 surrogate (JSON `"\\ud800"`) cannot be encoded at
all (the tokenizer raises), and C0 control characters other than whitespace are refused
in what the model reads, rather than passed to a model that never saw them (stop strings,
only compared with the output, may hold them). Tab, newline, vertical tab, form feed
and carriage return are ordinary text (source code carries them) and are kept.
"""
from __future__ import annotations

import re

from specserve_ray.errors import RequestError, UnsupportedParameter

# Token ids travel as int32 on the workers' tensors and over gRPC; the vocabulary check
# against the served model happens where the vocabulary is known (the engine).
MAX_TOKEN_ID = 2**31 - 1

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f]")


def check_text(value: str, param: str | None = None, controls: bool = False) -> str:
    """`value` if it is text every layer can carry; RequestError naming `param` otherwise.

    `controls=True` lets control characters through: for text that is only compared with
    the output (stop strings), never fed to the model, where they match exactly.
    """
    where = param or "text"
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string, got {kind_of(value)}", param,
                           "invalid_type")
    bad = _SURROGATE.search(value)
    if bad:
        raise RequestError(f"{where} contains a lone UTF-16 surrogate "
                           f"(U+{ord(bad.group()):04X}) at character {bad.start()}; text must "
                           "be valid Unicode", param, "invalid_value")
    bad = None if controls else _CONTROL.search(value)
    if bad:
        raise RequestError(f"{where} contains the control character "
                           f"U+{ord(bad.group()):04X} at character {bad.start()}; of the "
                           "control characters only tab, newline, vertical tab, form feed "
                           "and carriage return are accepted", param, "invalid_value")
    return value


def check_prompt(value, param: str = "prompt") -> str | list[int]:
    """A completion prompt: one string, a list of one string, or one list of token ids.

    Several prompts (a batch of strings or of token lists) are refused: one request
    answers one prompt here (n and batching are not supported).
    """
    if isinstance(value, str):
        if not value:
            raise RequestError("prompt is empty", param, "invalid_value")
        return check_text(value, param)
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"prompt must be a string or a list of token ids, got "
                           f"{kind_of(value)}", param, "invalid_type")
    if not value:
        raise RequestError("prompt is empty", param, "invalid_value")
    if all(isinstance(x, str) for x in value):
        if len(value) != 1:
            raise UnsupportedParameter(param, f"prompt is a list of {len(value)} strings; "
                                       "one prompt per request is supported (send one "
                                       "request per prompt)")
        return check_prompt(value[0], f"{param}[0]")
    if all(isinstance(x, list) for x in value):
        raise UnsupportedParameter(param, f"prompt is a list of {len(value)} token-id lists "
                                   "(a batch); one prompt per request is supported")
    for i, tok in enumerate(value):
        if type(tok) is not int:   # bool is an int subclass: refused too
            raise RequestError(f"{param}[{i}] is {kind_of(tok)}; token ids are integers",
                               f"{param}[{i}]", "invalid_type")
        if not 0 <= tok <= MAX_TOKEN_ID:
            raise RequestError(f"{param}[{i}] = {tok} is not a token id: token ids are in "
                               "[0, vocabulary size)", f"{param}[{i}]", "invalid_value")
    return list(value)


def kind_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})" if len(repr(value)) <= 24 else "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__
