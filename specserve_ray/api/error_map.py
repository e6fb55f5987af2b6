"""Every failure's answer, decided in one place: HTTP status, gRPC code, OpenAI error body.

    RequestError, pydantic ValidationError  400  INVALID_ARGUMENT    the message says why
    AuthError                               401  UNAUTHENTICATED     no key ever echoed
    PayloadTooLargeError                    413  INVALID_ARGUMENT
    OverloadedError (queue bound)           429  RESOURCE_EXHAUSTED  + Retry-After
    UnavailableError                        503  UNAVAILABLE         + Retry-After when known
    anything else                           500  INTERNAL            generic message + id

Client-fixable errors carry their message. Server errors never do: `str(exc)` of a
remote Ray error holds tracebacks, pids and addresses. Their body says only "internal
server error" with a server-generated error id, and the server logs the exception under
the same id so an operator can find it. Pure: no grpc import (codes are names of
`grpc.StatusCode` members), no HTTP server.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydantic import ValidationError

from specserve_ray.api.auth import AuthError
from specserve_ray.api.validation import request_error
from specserve_ray.errors import (OverloadedError, PayloadTooLargeError, RequestError,
                                  UnavailableError)


@dataclass(frozen=True)
class ErrorReply:
    status: int                   # HTTP status
    grpc_code: str                # name of a grpc.StatusCode member
    message: str                  # safe to send to the client
    err_type: str                 # OpenAI error.type
    code: str | int | None = None  # OpenAI error.code (e.g. "unsupported_parameter")
    param: str | None = None      # OpenAI error.param: the offending field, when known
    retry_after_s: int | None = None
    error_id: str | None = None   # set on 5xx: the id in the server's log line

    @property
    def server_fault(self) -> bool:
        return self.status >= 500 and self.status != 503


def new_error_id() -> str:
    return f"err-{uuid.uuid4().hex[:16]}"


def classify(exc: BaseException, retry_after_s: int | None = None,
             error_id: str | None = None) -> ErrorReply:
    """The reply for `exc`. `retry_after_s` is the caller's current estimate, used when
    the exception carries none; `error_id` (5xx only) defaults to a fresh one."""
    if isinstance(exc, AuthError):
        return ErrorReply(401, "UNAUTHENTICATED", str(exc), "invalid_request_error",
                          "invalid_api_key")
    if isinstance(exc, ValidationError):     # named fields: param and code as in the body
        exc = request_error(exc)
    if isinstance(exc, PayloadTooLargeError):
        return ErrorReply(413, "INVALID_ARGUMENT", str(exc), "invalid_request_error",
                          "payload_too_large")
    if isinstance(exc, RequestError):
        return ErrorReply(400, "INVALID_ARGUMENT", str(exc), "invalid_request_error",
                          getattr(exc, "code", None) or 400, getattr(exc, "param", None))
    if isinstance(exc, (OverloadedError, UnavailableError)):
        hint = exc.retry_after_s if exc.retry_after_s is not None else retry_after_s
        hint = None if hint is None else max(1, int(round(hint)))
        if isinstance(exc, OverloadedError):
            return ErrorReply(429, "RESOURCE_EXHAUSTED", str(exc), "rate_limit_error", 429,
                              retry_after_s=hint)
        return ErrorReply(503, "UNAVAILABLE", str(exc), "server_error", 503,
                          retry_after_s=hint)
    error_id = error_id or new_error_id()
    return ErrorReply(500, "INTERNAL", f"internal server error (error id {error_id}); "
                      "the server log has the details", "server_error", 500,
                      error_id=error_id)


def openai_body(reply: ErrorReply) -> dict:
    return {"error": {"message": reply.message, "type": reply.err_type, "param": reply.param,
                      "code": reply.code}}


def http_headers(reply: ErrorReply) -> dict[str, str]:
    headers = {}
    if reply.retry_after_s is not None:
        headers["Retry-After"] = str(reply.retry_after_s)
    if reply.error_id is not None:
        headers["X-Error-Id"] = reply.error_id
    if reply.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def grpc_details(reply: ErrorReply) -> str:
    if reply.retry_after_s is not None:
        return f"{reply.message} (retry after {reply.retry_after_s} s)"
    return reply.message


def grpc_trailers(reply: ErrorReply) -> list[tuple[str, str]]:
    out = []
    if reply.retry_after_s is not None:
        out.append(("retry-after", str(reply.retry_after_s)))
    if reply.error_id is not None:
        out.append(("error-id", reply.error_id))
    return out
