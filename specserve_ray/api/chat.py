"""Chat messages: what a conversation may contain, and rendering it into one prompt.

Only text goes in. Content parts a text model cannot read (images, audio, files) and
tool traffic (tool messages, tool calls) are refused with the part named, never dropped.
"""
from __future__ import annotations

from specserve_ray.api.inputs import check_text, kind_of
from specserve_ray.errors import RequestError, UnsupportedParameter

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

ROLES = ("system", "developer", "user", "assistant")
_TOOL_ROLES = ("tool", "function")
# Message fields OpenAI defines that would change the conversation if honoured; they are
# accepted only at their neutral value (absent, null, or an empty list of tool calls).
_UNSUPPORTED_FIELDS = {"name": "message names are not supported",
                       "tool_calls": "tool calls are not supported",
                       "function_call": "function calls are not supported",
                       "tool_call_id": "tool messages are not supported",
                       "audio": "audio messages are not supported",
                       "refusal": "assistant refusals are not supported"}
_MEDIA_PARTS = ("image_url", "input_image", "input_audio", "file", "refusal")


def parse_messages(raw) -> list[dict]:
    """OpenAI `messages` -> [{"role", "content": str}]; RequestError naming the bad part."""
    if not isinstance(raw, list):
        raise RequestError(f"messages must be a list of messages, got {kind_of(raw)}",
                           "messages", "invalid_type")
    if not raw:
        raise RequestError("messages must hold at least one message", "messages",
                           "invalid_value")
    return [_parse_message(m, f"messages[{i}]") for i, m in enumerate(raw)]


def _parse_message(msg, where: str) -> dict:
    if not isinstance(msg, dict):
        raise RequestError(f"{where} must be an object with role and content, got "
                           f"{kind_of(msg)}", where, "invalid_type")
    role = msg.get("role")
    if role in _TOOL_ROLES:
        raise UnsupportedParameter(f"{where}.role", f"{where}.role: {role!r} messages are not "
                                   "supported (this server does no tool calling)")
    if "role" not in msg:
        raise RequestError(f"Missing required parameter: '{where}.role'", f"{where}.role",
                           "missing_required_parameter")
    if not isinstance(role, str):
        raise RequestError(f"{where}.role must be a string, got {kind_of(role)}",
                           f"{where}.role", "invalid_type")
    if role not in ROLES:
        raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}",
                           f"{where}.role", "invalid_value")
    for key, value in msg.items():
        if key in ("role", "content"):
            continue
        if key in _UNSUPPORTED_FIELDS:
            if value is None or value == []:
                continue
            raise UnsupportedParameter(f"{where}.{key}", f"{where}.{key}: "
                                       f"{_UNSUPPORTED_FIELDS[key]}")
        raise RequestError(f"Unrecognized message field supplied: {where}.{key}",
                           f"{where}.{key}", "unknown_parameter")
    if "content" not in msg:
        raise RequestError(f"Missing required parameter: '{where}.content'",
                           f"{where}.content", "missing_required_parameter")
    return {"role": role, "content": _content_text(msg["content"], f"{where}.content")}


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return check_text(content, where)
    if content is None:
        raise RequestError(f"{where} is null; every message needs text content (a string "
                           "or a list of text parts)", where, "invalid_value")
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of text parts, got "
                           f"{kind_of(content)}", where, "invalid_type")
    if not content:
        raise RequestError(f"{where} is an empty list of parts", where, "invalid_value")
    return "".join(_part_text(p, f"{where}[{j}]") for j, p in enumerate(content))


def _part_text(part, where: str) -> str:
    if not isinstance(part, dict):
        raise RequestError(f"{where} must be a content part object, got {kind_of(part)}",
                           where, "invalid_type")
    kind = part.get("type")
    if kind in _MEDIA_PARTS:
        raise UnsupportedParameter(f"{where}.type", f"{where}.type: {kind!r} content parts "
                                   "are not supported; this model reads text parts only")
    if kind != "text":
        raise RequestError(f"{where}.type must be 'text', got {kind!r}", f"{where}.type",
                           "invalid_value")
    extra = sorted(set(part) - {"type", "text"})
    if extra:
        raise RequestError(f"Unrecognized content part field supplied: {where}.{extra[0]}",
                           f"{where}.{extra[0]}", "unknown_parameter")
    if "text" not in part:
        raise RequestError(f"Missing required parameter: '{where}.text'", f"{where}.text",
                           "missing_required_parameter")
    if not isinstance(part["text"], str):
        raise RequestError(f"{where}.text must be a string, got {kind_of(part['text'])}",
                           f"{where}.text", "invalid_type")
    return check_text(part["text"], f"{where}.text")


def render_chat(tokenizer, messages: list[dict], template: str | None) -> str:
    """The conversation as one prompt; a template that refuses it is the request's fault
    (roles out of the order it accepts, say), so it becomes a RequestError."""
    from jinja2 import TemplateError

    chosen = template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chosen, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as exc:
        raise RequestError(f"the chat template cannot render these messages: {exc}",
                           "messages", "invalid_value") from None
