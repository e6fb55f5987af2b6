"""The per-request output streams between the step loop and whoever reads them.

The loop hands each request's delta (or the error that ends it) to the request's queue; the
reader (HTTP/gRPC/handle stream) takes them one by one. A reader that leaves a delta untaken
for longer than the stall limit (`faults.stalled_client_s`) has stopped reading (a stuck client): `deliver` reports it
through `on_stalled` and ends the stream with an error instead of buffering without bound.
No engine, Ray or model code here: the loop decides what a stalled request costs.
`collect_result` folds one stream into the whole answer (non-streaming callers).
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, AsyncIterator, Callable

from specserve_ray.errors import RequestError

if TYPE_CHECKING:
    from specserve_ray.request import RequestOutput


class RequestStreams:
    def __init__(self, stall_limit: Callable[[], float | None],
                 on_stalled: Callable[[str], None]):
        self._stall_limit = stall_limit     # seconds (or None = never), read at each delivery
        self._on_stalled = on_stalled       # abort the request, count it
        self._queues: dict[str, asyncio.Queue] = {}
        self._untaken_since: dict[str, float] = {}   # rid -> when its reader fell behind

    def open(self, rid: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        return queue

    def close(self, rid: str) -> None:
        self._queues.pop(rid, None)
        self._untaken_since.pop(rid, None)

    def fail(self, rid: str, error: BaseException) -> None:
        """End a request's stream with `error` (the reader raises it)."""
        queue = self._queues.get(rid)
        if queue is not None:
            queue.put_nowait(error)

    def deliver(self, rid: str, out, now: float) -> None:
        """Hand a delta to its stream, unless the reader stopped taking them."""
        queue = self._queues.get(rid)
        if queue is None:             # nobody reads it (it left already)
            return
        stall = self._stall_limit()
        if queue.qsize():             # the reader has not taken what was there
            since = self._untaken_since.get(rid, now)
            if stall is not None and now - since > stall and not out.finished:
                self._on_stalled(rid)
                queue.put_nowait(RequestError(f"request {rid} aborted: the client took no "
                                              f"output for {stall:g} s"))
                return
        else:
            self._untaken_since[rid] = now
        queue.put_nowait(out)

    async def take(self, rid: str, queue: asyncio.Queue, deadline: float | None):
        """The next item of a stream (a delta or an error to raise); asyncio.TimeoutError
        past `deadline` (time.monotonic())."""
        if deadline is None:
            item = await queue.get()
        else:
            item = await asyncio.wait_for(queue.get(), deadline - time.monotonic())
        # The reader keeps up: what is left was handed over just now at worst.
        if queue.qsize():
            self._untaken_since[rid] = time.monotonic()
        else:
            self._untaken_since.pop(rid, None)
        return item


async def collect_result(stream: AsyncIterator[RequestOutput]) -> dict:
    """A whole request from its stream of deltas: text, token ids, finish reason, usage
    and its speculation summary (what the handle, HTTP and gRPC return when not streaming)."""
    token_ids: list[int] = []
    text: list[str] = []
    last = None
    async for out in stream:
        token_ids.extend(out.new_token_ids)
        text.append(out.new_text)
        last = out
    return {"request_id": last.request_id, "text": "".join(text), "token_ids": token_ids,
            "finish_reason": last.finish_reason, "prompt_tokens": last.num_prompt_tokens,
            "completion_tokens": last.num_output_tokens, "speculation": last.spec.summary()}
