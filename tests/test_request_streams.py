"""RequestStreams: per-request output queues and stalled-reader detection (pure asyncio)."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from specserve_ray.errors import RequestError
from specserve_ray.request_streams import RequestStreams


def _out(finished=False):
    return SimpleNamespace(finished=finished)


def test_deltas_arrive_in_order_and_a_closed_stream_drops_them():
    async def main():
        stalled = []
        streams = RequestStreams(lambda: None, stalled.append)
        q = streams.open("a")
        first, second = _out(), _out(True)
        streams.deliver("a", first, now=0.0)
        streams.deliver("a", second, now=1e6)      # no limit: never a stall
        assert await streams.take("a", q, None) is first
        assert await streams.take("a", q, None) is second
        streams.close("a")
        streams.deliver("a", _out(), now=0.0)      # nobody reads it: dropped, no error
        streams.fail("a", RuntimeError("x"))
        assert q.qsize() == 0 and stalled == []
    asyncio.run(main())


def test_a_reader_that_stops_taking_is_reported_and_its_stream_ends():
    async def main():
        stalled = []
        limit = [2.0]
        streams = RequestStreams(lambda: limit[0], stalled.append)
        q = streams.open("a")
        streams.deliver("a", _out(), now=10.0)     # taken promptly below: not behind
        await streams.take("a", q, None)
        streams.deliver("a", _out(), now=11.0)     # untaken from here on
        streams.deliver("a", _out(), now=12.5)     # 1.5 s behind: still within the limit
        assert stalled == []
        streams.deliver("a", _out(), now=13.5)     # 2.5 s behind: stalled
        assert stalled == ["a"]
        items = [q.get_nowait() for _ in range(q.qsize())]
        assert isinstance(items[-1], RequestError) and "took no output" in str(items[-1])
        # The final delta of a finished request is always handed over.
        q2 = streams.open("b")
        streams.deliver("b", _out(), now=0.0)
        streams.deliver("b", _out(), now=0.5)
        streams.deliver("b", _out(True), now=100.0)
        assert stalled == ["a"] and q2.qsize() == 3
    asyncio.run(main())


def test_take_times_out_at_the_deadline_and_fail_ends_a_stream():
    async def main():
        streams = RequestStreams(lambda: None, lambda rid: None)
        q = streams.open("a")
        with pytest.raises(asyncio.TimeoutError):
            await streams.take("a", q, time.monotonic() + 0.05)
        err = RuntimeError("worker lost")
        streams.fail("a", err)
        assert await streams.take("a", q, None) is err
    asyncio.run(main())
