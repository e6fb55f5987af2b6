"""Async streaming load generator for any OpenAI-compatible /v1/completions endpoint.

Open loop: every request is sent at its scheduled arrival time whether or not earlier
ones have finished (a closed loop would hide queueing, the very thing load measures).
Every request ends as a record: completed, or failed with a reason (HTTP status, an
error event inside the stream, a timeout); nothing is dropped, nothing hangs past the
per-request timeout and the drain deadline.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestRecord:
    index: int
    input_tokens: int
    max_tokens: int
    sent_s: float = 0.0                 # since the run's start (the first scheduled arrival)
    first_token_s: float | None = None  # first chunk carrying text
    chunk_s: list[float] = field(default_factory=list)   # every text-carrying chunk
    end_s: float | None = None
    output_tokens: int = 0              # from the final usage chunk
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None and self.first_token_s is not None

    @property
    def ttft(self) -> float | None:
        return self.first_token_s - self.sent_s if self.ok else None

    @property
    def e2e(self) -> float | None:
        return self.end_s - self.sent_s if self.ok else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's definition)."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between text-carrying chunks. A speculative step streams several tokens
        in one chunk, so these are per-step gaps, as vLLM's ITL is under speculation."""
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])] if self.ok else []


def completion_body(prompt: str, max_tokens: int, model: str | None,
                    slo_class: str | None = None) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            # Force the trace's output length: no early EOS.
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    if slo_class:
        body["slo_class"] = slo_class
    return body


async def send_one(client: httpx.AsyncClient, url: str, rec: RequestRecord, prompt: str,
                   model: str | None, t0: float, timeout_s: float,
                   slo_class: str | None = None) -> RequestRecord:
    """Stream one completion into `rec` (times relative to `t0`, a perf_counter)."""
    rec.sent_s = time.perf_counter() - t0
    try:
        # wait_for, not asyncio.timeout: the package supports Python 3.10.
        await asyncio.wait_for(_stream(client, url, rec, prompt, model, t0, slo_class),
                               timeout_s)
    except asyncio.TimeoutError:
        rec.error = f"timeout after {timeout_s:.0f} s"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
    return rec


async def _stream(client: httpx.AsyncClient, url: str, rec: RequestRecord, prompt: str,
                  model: str | None, t0: float, slo_class: str | None = None) -> None:
    body = completion_body(prompt, rec.max_tokens, model, slo_class)
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode("utf-8", "replace")[:200]
            rec.error = f"http {r.status_code}: {text}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data.strip() == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                rec.error = "stream error: " + str(chunk["error"].get("message"))[:200]
                return
            now = time.perf_counter() - t0
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                rec.chunk_s.append(now)
                if rec.first_token_s is None:
                    rec.first_token_s = now
            if chunk.get("usage"):
                rec.output_tokens = int(chunk["usage"]["completion_tokens"])
        rec.end_s = time.perf_counter() - t0
        if rec.first_token_s is None:
            rec.error = "no tokens streamed"
        elif rec.output_tokens == 0:
            # No usage chunk (an endpoint without stream_options): count chunks.
            rec.output_tokens = len(rec.chunk_s)


async def run_open_loop(url: str, prompts: list[str], input_tokens: list[int],
                        output_tokens: list[int], arrivals: list[float], model: str | None,
                        timeout_s: float = 120.0, drain_s: float = 120.0,
                        progress=None, slo_class: str | None = None
                        ) -> tuple[list[RequestRecord], float]:
    """Send request i at arrivals[i] seconds; wait for all (at most `drain_s` after the
    last arrival). Returns the records and the run's duration (first send to last end)."""
    records = [RequestRecord(i, n_in, n_out) for i, (n_in, n_out)
               in enumerate(zip(input_tokens, output_tokens))]
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        t0 = time.perf_counter()

        async def scheduled(rec: RequestRecord, prompt: str, at: float):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            await send_one(client, url, rec, prompt, model, t0, timeout_s, slo_class)
            if progress is not None:
                progress.update(1)

        tasks = [asyncio.create_task(scheduled(r, p, a))
                 for r, p, a in zip(records, prompts, arrivals)]
        deadline = (arrivals[-1] if arrivals else 0.0) + drain_s
        _, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline))
        for task in pending:       # past the drain deadline: counted as failed, not lost
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for rec in records:
        if rec.end_s is None and rec.error is None:
            rec.error = "not finished by the drain deadline"
    ends = [r.end_s for r in records if r.end_s is not None]
    duration = (max(ends) if ends else time.perf_counter() - t0) - (arrivals[0] if arrivals else 0.0)
    return records, max(duration, 1e-9)


async def run_closed_loop(url: str, prompts: list[str], input_tokens: list[int],
                          output_tokens: list[int], concurrency: int, model: str | None,
                          timeout_s: float = 120.0) -> tuple[list[RequestRecord], float]:
    """`concurrency` clients, each sending its next request when the last one ends
    (used to measure capacity and single-stream step time)."""
    records = [RequestRecord(i, n_in, n_out) for i, (n_in, n_out)
               in enumerate(zip(input_tokens, output_tokens))]
    queue = list(zip(records, prompts))[::-1]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        t0 = time.perf_counter()

        async def client_loop():
            while queue:
                rec, prompt = queue.pop()
                await send_one(client, url, rec, prompt, model, t0, timeout_s)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    return records, duration


async def get_json(url: str, path: str, timeout_s: float = 30.0) -> dict:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        r = await client.get(url + path)
        r.raise_for_status()
        return r.json()
