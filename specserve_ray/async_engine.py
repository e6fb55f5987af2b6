"""AsyncSpecEngine: the router's step loop over any transport, with streams per request.

The engine plans each step and applies its result; the transport (in-process thread, Ray
actor calls, or a Ray compiled graph) executes it on the draft and target workers. Between
steps new requests join and cancelled ones leave; their caches are released on both
workers with the next plan, so one message per step carries everything.

Backpressure: at most `max_queued` requests wait for a batch slot; past that a request
fails at once with OverloadedError (HTTP 503), never hangs.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

from specserve_ray.config import SamplingParams
from specserve_ray.engine import RequestOutput, SpecEngine
from specserve_ray.errors import OverloadedError
from specserve_ray.contracts import StepPlan, StepResult

log = logging.getLogger("specserve_ray")

Execute = Callable[[StepPlan], Awaitable[StepResult]]
# on_step(plan, result, seconds, outputs, requests): called after every applied step with
# the requests that were in the batch (finished ones included); must be cheap and never
# block (metrics). Its errors are logged once and never fail a step.
OnStep = Callable[[StepPlan, StepResult, float, list, list], None]


class StepFailed(RuntimeError):
    """The workers failed while executing a step; the requests in it are failed."""


class AsyncSpecEngine:
    def __init__(self, engine: SpecEngine, execute: Execute, max_queued: int = 64,
                 pipeline: bool = False, on_step: OnStep | None = None):
        self.engine = engine
        self.on_step = on_step
        self._on_step_failed = False
        engine.release_eagerly = False
        self.execute = execute
        self.max_queued = max_queued
        # Draft/verify pipelining: two micro-batches in flight, so the draft worker drafts
        # one while the target verifies the other (each request is in one at a time).
        self.pipeline = pipeline
        self._in_flight: dict[asyncio.Task, StepPlan] = {}
        self._busy: set[str] = set()
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.num_steps = 0            # executed plans
        self.num_overlapped_steps = 0 # plans launched while another was in flight
        self.num_target_calls = 0     # calls to the target worker (one per step)
        self.num_decode_steps = 0
        self.num_decode_rows = 0      # requests verified, summed over steps
        self.step_seconds = 0.0
        # Held while steps are in flight; `paused()` takes it to stop the loop between
        # steps (e.g. to profile the workers for a policy switch).
        self.step_lock = asyncio.Lock()
        self._pause_waiters = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop after the steps in flight finish (their results are applied):
        a step abandoned mid-flight would leave the workers' state ahead of the engine's,
        and a compiled graph expects every execution's result to be read."""
        if self._task is not None:
            async with self.paused():
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
            self._task = None

    # -- requests --------------------------------------------------------------------------------
    async def generate_stream(self, prompt, params: SamplingParams | None = None,
                              request_id: str | None = None,
                              num_speculative_tokens: int | None = None,
                              slo_class: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield one delta per step until the request finishes.

        Leaving the iteration early (client disconnect, cancellation) aborts the request
        and frees its caches on both workers.
        """
        self.start()
        if len(self.engine.waiting) >= self.max_queued:
            raise OverloadedError(f"server overloaded: {len(self.engine.waiting)} requests "
                                  "already queued; retry later")
        rid = self.engine.add_request(prompt, params, request_id, num_speculative_tokens,
                                      slo_class)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.engine.abort(rid)
                self._wake.set()   # the release travels with the next plan

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None,
                       num_speculative_tokens: int | None = None,
                       slo_class: str | None = None) -> dict:
        """Run one request to completion; returns its text, token ids and statistics."""
        token_ids: list[int] = []
        text = []
        last = None
        async for out in self.generate_stream(prompt, params, request_id, num_speculative_tokens,
                                              slo_class):
            token_ids.extend(out.new_token_ids)
            text.append(out.new_text)
            last = out
        return {"request_id": last.request_id, "text": "".join(text), "token_ids": token_ids,
                "finish_reason": last.finish_reason, "prompt_tokens": last.num_prompt_tokens,
                "completion_tokens": last.num_output_tokens, "speculation": last.spec.summary()}

    # -- the loop --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def paused(self):
        """No step runs inside this block: in-flight steps finish first, none start."""
        self._pause_waiters += 1
        self._wake.set()
        try:
            async with self.step_lock:
                yield
        finally:
            self._pause_waiters -= 1
            self._wake.set()

    async def _loop(self) -> None:
        try:
            while True:
                async with self.step_lock:
                    while not self._pause_waiters:
                        self._wake.clear()
                        self._submit_steps()
                        # Wake on a finished step or on news (arrival, abort, pause).
                        woken = asyncio.ensure_future(self._wake.wait())
                        done, _ = await asyncio.wait({woken, *self._in_flight},
                                                     return_when=asyncio.FIRST_COMPLETED)
                        if woken not in done:
                            woken.cancel()
                        for task in done:
                            if task is not woken:
                                self._finish(task)
                    while self._in_flight:    # pausing: drain, start nothing new
                        done, _ = await asyncio.wait(self._in_flight,
                                                     return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            self._finish(task)
                await asyncio.sleep(0)        # paused() is queued on the lock: it goes first
        finally:
            for task in self._in_flight:
                task.cancel()

    def _submit_steps(self) -> None:
        """Plan and launch steps until the pipeline is full or nothing is left to plan."""
        depth = 2 if self.pipeline else 1
        while len(self._in_flight) < depth and not self._pause_waiters:
            max_rows = None
            if depth > 1 and not self._in_flight:
                # Nothing in flight: take half the free requests now, the rest next.
                free = sum(1 for r in self.engine.running if not r.finished)
                free += min(len(self.engine.waiting),
                            self.engine.limits.max_num_seqs - len(self.engine.running))
                max_rows = (free + 1) // 2
            plan = self.engine.plan_step(self._busy, max_rows)
            if plan is None:
                return
            if self._in_flight:
                self.num_overlapped_steps += 1
            self._busy.update(plan.decode_ids)
            self._busy.update(p.seq_id for p in plan.prefill)
            task = asyncio.get_running_loop().create_task(self._execute(plan))
            self._in_flight[task] = plan

    async def _execute(self, plan: StepPlan):
        start = time.perf_counter()   # a step's time includes planning (router work)
        result = await self.execute(plan)
        return result, time.perf_counter() - start

    def _finish(self, task: asyncio.Task) -> None:
        plan = self._in_flight.pop(task)
        self._busy.difference_update(plan.decode_ids)
        self._busy.difference_update(p.seq_id for p in plan.prefill)
        try:
            result, seconds = task.result()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a worker failed: fail this step's requests, live on
            log.exception("step failed")
            self.engine.forget_plan(plan)
            self._fail(plan, StepFailed(f"worker step failed: {exc}"))
            return
        self.num_steps += 1
        self.num_target_calls += 1
        if plan.decode_ids:
            self.num_decode_steps += 1
            self.num_decode_rows += len(plan.decode_ids)
        self.step_seconds += seconds
        batch = None
        if self.on_step is not None:
            # This plan's requests only: with pipelining another micro-batch is running too.
            rows = {*plan.decode_ids, *(p.seq_id for p in plan.prefill)}
            batch = [r for r in self.engine.running if r.request_id in rows]
        outputs = self.engine.apply_step(plan, result, seconds)
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        if batch is not None:
            self._notify(plan, result, seconds, outputs, batch)

    def _notify(self, plan, result, seconds, outputs, batch) -> None:
        try:
            self.on_step(plan, result, seconds, outputs, batch)
        except Exception:  # noqa: BLE001 - metrics must never fail a step
            if not self._on_step_failed:
                self._on_step_failed = True
                log.exception("on_step hook failed (logged once; serving goes on)")

    def _fail(self, plan: StepPlan, error: Exception) -> None:
        ids = [p.seq_id for p in plan.prefill] + list(plan.decode_ids)
        for rid in ids:
            self.engine.abort(rid)
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(error)

    def stats(self) -> dict:
        eng = self.engine
        return {
            "step_time_s": eng.step_totals.summary(),
            "running": len(eng.running), "waiting": len(eng.waiting),
            "steps": self.num_steps, "decode_steps": self.num_decode_steps,
            "target_calls": self.num_target_calls,
            "target_calls_per_step": (self.num_target_calls / self.num_steps) if self.num_steps else 0.0,
            "mean_batch_size": (self.num_decode_rows / self.num_decode_steps) if self.num_decode_steps else 0.0,
            "speculation": eng.totals.summary(),
            "policy": eng.speculation.policy,
            "pipeline": self.pipeline, "overlapped_steps": self.num_overlapped_steps,
            # Mean k chosen per decode row since the policy last changed.
            "mean_chosen_k": eng.mean_chosen_k,
            # Decode rows per chosen k, cumulative since start (diff two snapshots).
            "chosen_k_counts": list(eng.chosen_k_counts),
            "synthetic_acceptance_rate": eng.speculation.synthetic_acceptance_rate,
            # Per SLO class: budgets, finished requests, attained fraction, TTFT/TPOT.
            "slo": eng.slo_summary(),
        }
