"""Errors a caller can act on. RequestError means the request itself is invalid (HTTP 400).

How each maps to an HTTP status, a gRPC code and a response body is decided in one place:
`specserve_ray/api/error_map.py`.
"""


class RequestError(ValueError):
    """The request is invalid; the message says why. Maps to HTTP 400 / gRPC INVALID_ARGUMENT."""


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
