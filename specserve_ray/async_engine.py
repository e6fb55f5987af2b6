"""AsyncSpecEngine: the router's step loop over any transport, with streams per request.

The engine plans each step and applies its result; the transport (in-process thread, Ray
actor calls, or a Ray compiled graph) executes it on the draft and target workers. Between
steps new requests join and cancelled ones leave; their caches are released on both
workers with the next plan, so one message per step carries everything.

Backpressure: at most `max_queued` requests wait for a batch slot; past that a request
fails at once with OverloadedError (HTTP 503), never hangs.

Faults (README "Faults and recovery"): every step has a deadline; a step that raises
sends its requests back with their committed tokens and retries each alone, so only a
request that fails on its own is failed; a lost target (`TargetLost`) re-admits every
running request as prompt + committed output after `recover_target`; the draft side
degrades to target-only steps (`speculation_down` / `resync_draft`, driven by the
worker group). A crash of the loop itself is restarted by a supervisor.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from dataclasses import replace
from typing import AsyncIterator, Awaitable, Callable

from specserve_ray.config import FaultsConfig
from specserve_ray.contracts import StepPlan, StepResult
from specserve_ray.engine import Request, RequestOutput, SpecEngine
from specserve_ray.errors import OverloadedError, RequestError, UnavailableError
from specserve_ray.metrics import FaultCounts
from specserve_ray.request_streams import RequestStreams, collect_result  # noqa: F401
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.step_timing import hop_times
from specserve_ray.supervision import (RequestTimeout, StepAbandoned, StepFailed,  # noqa: F401
                                       Supervision, TargetLost)

log = logging.getLogger("specserve_ray")

Execute = Callable[[StepPlan], Awaitable[StepResult]]
# on_step(plan, result, seconds, outputs, requests): called after every applied step with
# the requests that were in the batch (finished ones included); must be cheap and never
# block (metrics). Its errors are logged once and never fail a step.
OnStep = Callable[[StepPlan, StepResult, float, list, list], None]


class AsyncSpecEngine(Supervision):
    def __init__(self, engine: SpecEngine, execute: Execute, max_queued: int = 64,
                 pipeline: bool = False, on_step: OnStep | None = None,
                 faults: FaultsConfig | None = None,
                 recover_target: Callable[[], Awaitable[None]] | None = None):
        self.engine = engine
        self.fault_cfg = faults or FaultsConfig()
        self.faults = FaultCounts()
        # Recreates the target worker (the worker group); None = a lost target is fatal.
        self.recover_target = recover_target
        try:
            self._timed_execute = "timeout" in inspect.signature(execute).parameters
        except (TypeError, ValueError):
            self._timed_execute = False
        self._suspects: deque[Request] = deque()    # retried alone after a failed step
        self._probe: Request | None = None          # the one being retried now
        self._probe_steps = 0
        self._probe_plan: StepPlan | None = None
        self._strikes: dict[str, int] = {}          # isolated failures per request
        self._target_lost_at: float | None = None
        self._draft_down_at: float | None = None
        self.draft_up = engine.has_draft
        self.fatal: str | None = None       # unrecoverable: check_health turns red
        self.draining = False
        self._crashes: deque[float] = deque()
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
        self.streams = RequestStreams(lambda: self.fault_cfg.stalled_client_s,
                                      self._on_stalled)
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
            self._task = asyncio.get_running_loop().create_task(self._supervise())

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
    def _on_stalled(self, rid: str) -> None:
        """A reader stopped taking its output (a stuck client): abort it, free its slots."""
        self.engine.abort(rid)
        self._wake.set()
        self.faults.add("stalled_clients")

    async def generate_stream(self, prompt, params: SamplingParams | None = None,
                              request_id: str | None = None,
                              num_speculative_tokens: int | None = None,
                              slo_class: str | None = None,
                              timeout_s: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield one delta per step until the request finishes.

        Leaving the iteration early (client disconnect, cancellation) aborts the request
        and frees its caches on both workers. Past its deadline (`timeout_s`, at most the
        configured default) it ends with RequestTimeout.
        """
        self.start()
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError(f"request_id must be a string, got {type(request_id).__name__}")
        if timeout_s is not None and (isinstance(timeout_s, bool) or
                                      not isinstance(timeout_s, (int, float)) or not timeout_s > 0):
            raise RequestError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self._refuse_if_unavailable()
        limit = self.fault_cfg.request_timeout_s
        if timeout_s is not None:
            limit = timeout_s if limit is None else min(limit, timeout_s)
        deadline = None if limit is None else time.monotonic() + limit
        rid = self.engine.add_request(prompt, params, request_id, num_speculative_tokens,
                                      slo_class)
        queue = self.streams.open(rid)
        self._wake.set()
        finished = False
        try:
            while True:
                try:
                    item = await self.streams.take(rid, queue, deadline)
                except asyncio.TimeoutError:
                    self.faults.add("request_timeouts")
                    raise RequestTimeout(f"request {rid} passed its {limit:g} s deadline") from None
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self.streams.close(rid)
            self._strikes.pop(rid, None)
            if not finished:
                self._drop(rid)
                self._wake.set()   # the release travels with the next plan

    def _refuse_if_unavailable(self) -> None:
        if self.fatal is not None:
            self.faults.add("refused_unavailable")
            raise UnavailableError(f"replica unavailable: {self.fatal}", 5.0)
        if self.draining:
            self.faults.add("refused_draining")
            raise UnavailableError("replica is shutting down; retry on another replica", 1.0)
        if len(self.engine.waiting) >= self.max_queued:
            self.faults.add("refused_queue_full")
            raise OverloadedError(f"server overloaded: {len(self.engine.waiting)} requests "
                                  "already queued; retry later")

    def _drop(self, rid: str) -> None:
        """Abort a request wherever it is (queue, batch, or waiting for its isolated retry)."""
        self.engine.abort(rid)
        for r in list(self._suspects):
            if r.request_id == rid:
                self._suspects.remove(r)
        if self._probe is not None and self._probe.request_id == rid:
            self._probe = None

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None,
                       num_speculative_tokens: int | None = None,
                       slo_class: str | None = None, timeout_s: float | None = None) -> dict:
        """Run one request to completion; returns its text, token ids and statistics."""
        async with contextlib.aclosing(self.generate_stream(
                prompt, params, request_id, num_speculative_tokens, slo_class,
                timeout_s)) as stream:
            return await collect_result(stream)

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
                        if self._target_lost_at is not None and not self._in_flight:
                            await self._recover_target()
                            continue
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
                    if self._target_lost_at is not None:
                        await self._recover_target()
                await asyncio.sleep(0)        # paused() is queued on the lock: it goes first
        finally:
            for task in self._in_flight:
                task.cancel()

    def step_deadline(self) -> float:
        """The watchdog: generous, and scaled by the measured mean step time."""
        cfg = self.fault_cfg
        mean = self.step_seconds / self.num_steps if self.num_steps else 0.0
        return max(cfg.step_timeout_s, cfg.step_timeout_factor * mean)

    def _submit_steps(self) -> None:
        """Plan and launch steps until the pipeline is full or nothing is left to plan."""
        if self._target_lost_at is not None or self.fatal is not None:
            return
        if self._probe is None and self._suspects:
            self._probe, self._probe_steps = self._suspects.popleft(), 0
        if self._probe is not None:
            if not self._in_flight:
                self._submit_probe()
            return
        depth = 2 if self.pipeline else 1
        while len(self._in_flight) < depth and not self._pause_waiters:
            max_rows = None
            if depth > 1 and not self._in_flight:
                # Nothing in flight: take half the free requests now, the rest next.
                free = sum(1 for r in self.engine.running if not r.finished)
                free += min(len(self.engine.waiting),
                            self.engine.limits.max_num_seqs - len(self.engine.running))
                max_rows = (free + 1) // 2
            start = time.perf_counter()
            plan = self.engine.plan_step(self._busy, max_rows)
            if plan is None:
                return
            if self._in_flight:
                self.num_overlapped_steps += 1
            self._launch(plan, time.perf_counter() - start)

    def _launch(self, plan: StepPlan, plan_seconds: float = 0.0) -> None:
        self._busy.update(plan.decode_ids)
        self._busy.update(p.seq_id for p in plan.prefill)
        task = asyncio.get_running_loop().create_task(
            self._execute(plan, plan_seconds, time.monotonic()))
        self._in_flight[task] = plan

    async def _execute(self, plan: StepPlan, plan_seconds: float, launched: float):
        """-> (result, seconds from here to the result, router-side timing so far)."""
        start, started = time.perf_counter(), time.monotonic()
        deadline = self.step_deadline()
        if self._timed_execute:
            result = await self.execute(plan, timeout=deadline)
        else:
            result = await asyncio.wait_for(self.execute(plan), deadline)
        seconds, returned = time.perf_counter() - start, time.monotonic()
        hops = hop_times(started, returned, result.marks)
        timing = replace(hops, plan=plan_seconds, loop_wait=started - launched)
        return result, seconds, timing, returned

    def _finish(self, task: asyncio.Task) -> None:
        plan = self._in_flight.pop(task)
        self._busy.difference_update(plan.decode_ids)
        self._busy.difference_update(p.seq_id for p in plan.prefill)
        probe = plan is self._probe_plan
        if probe:
            self._probe_plan = None
        try:
            result, seconds, timing, returned = task.result()
        except asyncio.CancelledError:
            raise
        except TargetLost as exc:
            log.error("target worker lost: %s", exc)
            self._on_target_lost(plan)
            return
        except StepAbandoned as exc:
            log.warning("step abandoned (%s); its requests are re-admitted", exc)
            self._readmit_plan(plan, probe)
            return
        except Exception as exc:  # a worker raised: retry its requests alone, live on
            log.exception("step failed")
            self._on_step_error(plan, exc, probe)
            return
        if result.draft_error is not None and any(plan.num_draft):
            # The target alone finished this step (the draft failed): it is a k = 0 step.
            self.engine.forget_plan(plan)
            plan = replace(plan, num_draft=[0] * len(plan.decode_ids), draft_control=None)
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
        now = time.monotonic()
        applying = time.perf_counter()
        outputs = self.engine.apply_step(plan, result, seconds)
        for out in outputs:
            self.streams.deliver(out.request_id, out, now)
        if result.verify is not None:      # the steps step_totals counts
            self.engine.step_totals.add_router(replace(
                timing, apply=time.perf_counter() - applying,
                loop_wait=timing.loop_wait + now - returned))
        if probe and self._probe is not None:
            self._probe_steps += 1
            if self._probe.finished or self._probe_steps >= 2:
                self._strikes.pop(self._probe.request_id, None)
                self._probe = None            # passed alone: back in the normal batch
        if batch is not None:
            self._notify(plan, result, seconds, outputs, batch)

    def _notify(self, plan, result, seconds, outputs, batch) -> None:
        try:
            self.on_step(plan, result, seconds, outputs, batch)
        except Exception:  # noqa: BLE001 - metrics must never fail a step
            if not self._on_step_failed:
                self._on_step_failed = True
                log.exception("on_step hook failed (logged once; serving goes on)")

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
            "mean_chosen_k": eng.chooser.mean_chosen_k,
            # Decode rows per chosen k, cumulative since start (diff two snapshots).
            "chosen_k_counts": list(eng.chooser.chosen_k_counts),
            # Decode steps whose k caps were lowered to leave waiting prompts the budget
            # their TTFT needs (specserve with TTFT budgets; cumulative).
            "prefill_capped_steps": eng.chooser.prefill_capped_steps,
            "synthetic_acceptance_rate": eng.speculation.synthetic_acceptance_rate,
            # Per SLO class: budgets, finished requests, attained fraction, TTFT/TPOT.
            "slo": eng.slo_summary(),
            # Fault and recovery counters (README "Faults and recovery") and state now.
            "faults": {**self.faults.summary(), "draft_up": self.draft_up,
                       "target_up": self.target_up, "healthy": self.fatal is None,
                       "fatal": self.fatal, "draining": self.draining,
                       "isolating": len(self._suspects) + (self._probe is not None),
                       "step_deadline_s": round(self.step_deadline(), 3)},
        }
