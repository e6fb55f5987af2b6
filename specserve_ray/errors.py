"""Errors a caller can act on. RequestError means the request itself is invalid (HTTP 400)."""


class RequestError(ValueError):
    """The request is invalid; the message says why. Maps to HTTP 400 / gRPC INVALID_ARGUMENT."""


class OverloadedError(RuntimeError):
    """The server is at its queue bound; retry later. Maps to HTTP 503 / gRPC UNAVAILABLE."""
