"""Optional API keys (off by default): who may call the HTTP and gRPC front doors.

Keys come from `SPECSERVE_API_KEY` (one key, or several separated by commas) and/or a
key file (one key per line, `#` comments); either source turns checking on. A caller
sends `Authorization: Bearer <key>` (HTTP header, or gRPC metadata `authorization` with
the same value). Every configured key is compared in constant time (hmac.compare_digest,
no early exit), and no key or presented credential is ever logged or echoed.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

ENV_VAR = "SPECSERVE_API_KEY"
_SCHEME = "bearer"


class AuthError(Exception):
    """Missing or wrong credentials (HTTP 401 / gRPC UNAUTHENTICATED)."""


def parse_keys(text: str | None, from_file: bool = False) -> list[str]:
    """Keys from an env value (comma-separated) or a file (one per line, '#' comments)."""
    if not text:
        return []
    if from_file:
        parts = [line.split("#", 1)[0] for line in text.splitlines()]
    else:
        parts = text.split(",")
    return [p.strip() for p in parts if p.strip()]


def load_keys(env: dict | None = None, key_file: str | None = None) -> list[str]:
    env = os.environ if env is None else env
    keys = parse_keys(env.get(ENV_VAR))
    if key_file:
        path = Path(os.path.expanduser(key_file))
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            # The path is config, not a secret; the contents never reach a message.
            raise ValueError(f"api_key_file {key_file!r} cannot be read: "
                             f"{exc.strerror or type(exc).__name__}") from None
        file_keys = parse_keys(text, from_file=True)
        if not file_keys:
            raise ValueError(f"api_key_file {key_file!r} holds no key")
        keys += file_keys
    for key in keys:
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ValueError("an API key contains whitespace or control characters")
    return keys


class ApiKeyCheck:
    """Checks presented credentials against the configured keys (none = open)."""

    def __init__(self, keys: list[str]):
        self._keys = [k.encode("utf-8") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check_header(self, value: str | bytes | None) -> None:
        """Raise AuthError unless `value` is `Bearer <a configured key>` (or checks are off)."""
        if not self._keys:
            return
        if value is None:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        scheme, _, token = value.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != _SCHEME.encode() or not token:
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        matched = False
        for key in self._keys:       # no early exit: time does not depend on which key
            matched |= hmac.compare_digest(token, key)
        if not matched:
            raise AuthError("invalid API key")

    def check_metadata(self, metadata) -> None:
        """gRPC: the `authorization` entry of the invocation metadata."""
        if not self._keys:
            return
        value = None
        for key, val in metadata or ():
            if key.lower() == "authorization":
                value = val
                break
        self.check_header(value)
