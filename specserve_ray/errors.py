"""Errors a caller can act on. RequestError means the request itself is invalid (HTTP 400).

How each maps to an HTTP status, a gRPC code and a response body is decided in one place:
`specserve_ray/api/error_map.py`.
"""
from __future__ import annotations


class RequestError(ValueError):
    """The request is invalid; the message says why. Maps to HTTP 400 / gRPC INVALID_ARGUMENT.

    `param` names the offending field the way a client wrote it (`temperature`,
    `messages[1].content[0].text`), `code` is a short machine-readable reason
    (`invalid_type`, `invalid_value`, `unsupported_parameter`, `unknown_parameter`,
    `missing_required_parameter`); both end up in OpenAI's error body.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code

    def __reduce__(self):  # keep param/code across Ray's pickling of remote errors
        return (type(self), (str(self), self.param, self.code))


class UnsupportedParameter(RequestError):
    """A known OpenAI parameter this server does not implement, set to a value that would
    change the answer (tools, logprobs, n > 1...): refused rather than silently ignored."""

    def __init__(self, param: str, message: str | None = None):
        super().__init__(message or f"{param} is not supported by this server", param,
                         "unsupported_parameter")

    def __reduce__(self):
        return (type(self), (self.param, str(self)))


class OverloadedError(RuntimeError):
    """The server is at its queue bound; retry later. Maps to HTTP 429 / gRPC
    RESOURCE_EXHAUSTED, with `retry_after_s` (when known) as the client's retry hint."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(RuntimeError):
    """The server cannot take requests right now (e.g. draining, a worker recovering).
    Maps to HTTP 503 / gRPC UNAVAILABLE, with `retry_after_s` as the hint when known."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PayloadTooLargeError(RequestError):
    """The request body passes the configured size bound (HTTP 413)."""
