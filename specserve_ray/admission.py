"""Admission at the door: queue bounds in requests and tokens, and the Retry-After hint.

Pure: numbers in, decisions out (no asyncio, no Ray). The serving object feeds it the
waiting queue and the times requests finish; the adapters turn a refusal into HTTP 429
with a `Retry-After` header or gRPC RESOURCE_EXHAUSTED.

    retry_after = clamp(ceil((waiting + 1) / drain_rate), floor, ceiling)

`drain_rate` is finished requests per second over a sliding window: a new request gets
a slot once every waiting request ahead of it has one, and each finish frees one.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass


class DrainMeter:
    """Finished requests per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 30.0, max_events: int = 4096):
        self.window_s = window_s
        self._finishes: collections.deque[float] = collections.deque(maxlen=max_events)
        self._started: float | None = None

    def observe_finish(self, now: float) -> None:
        if self._started is None:
            self._started = now
        self._finishes.append(now)

    def start(self, now: float) -> None:
        """The time measuring began (a window younger than `window_s` divides by its age)."""
        if self._started is None:
            self._started = now

    def rate(self, now: float) -> float:
        cutoff = now - self.window_s
        while self._finishes and self._finishes[0] < cutoff:
            self._finishes.popleft()
        if not self._finishes:
            return 0.0
        span = min(self.window_s, now - (self._started if self._started is not None else now))
        return len(self._finishes) / max(span, 1.0)


def retry_after_s(waiting: int, drain_rate: float, floor_s: float, ceiling_s: float) -> int:
    """Whole seconds until a slot is likely free for a new request (HTTP Retry-After).

    With no measured drain (nothing finished lately) the ceiling: the queue is not
    moving, so the client should not hammer it.
    """
    if drain_rate <= 0.0:
        estimate = ceiling_s
    else:
        estimate = (waiting + 1) / drain_rate
    return int(math.ceil(min(max(estimate, floor_s), ceiling_s)))


@dataclass(frozen=True)
class Refusal:
    reason: str          # "queued_requests" | "queued_tokens"  (metrics label)
    message: str


@dataclass(frozen=True)
class QueueBounds:
    max_queued_requests: int
    max_queued_tokens: int | None = None

    def check(self, waiting_requests: int, waiting_tokens: int, new_tokens: int) -> Refusal | None:
        """None to admit; a Refusal when the new request would pass a bound.

        `*_tokens` count prompt + max_tokens. An empty queue always takes a request, so
        one larger than the token bound is not refused forever.
        """
        if waiting_requests >= self.max_queued_requests:
            return Refusal("queued_requests", f"server overloaded: {waiting_requests} requests "
                           "already queued; retry later")
        if (self.max_queued_tokens is not None and waiting_requests > 0
                and waiting_tokens + new_tokens > self.max_queued_tokens):
            return Refusal("queued_tokens", f"server overloaded: {waiting_tokens} tokens already "
                           f"queued (bound {self.max_queued_tokens}); retry later")
        return None
