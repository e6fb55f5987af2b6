"""The step loop's fault handling: isolation retries, re-admission, recovery, drain.

A mixin of AsyncSpecEngine (specserve_ray/async_engine.py), kept apart so the loop reads
on its own. What it guarantees (README "Faults and recovery"):

- a step that raises (workers alive) sends its requests back with their committed
  tokens and retries each alone (its prefill, then one decode step); only a request
  that fails alone twice is failed;
- a step whose effect on the workers is unknown (`StepAbandoned`) re-admits its
  requests: they prefill prompt + committed output again, so nothing is applied twice;
- a lost target (`TargetLost`) re-admits every running request and `recover_target`
  recreates the worker, bounded by faults.recovery_timeout_s; past it, or when the
  loop keeps crashing, every request ends with a clean error and liveness turns red;
- the draft side degrades to k = 0 steps (`speculation_down`) until a fresh draft is
  resynced with every running request's committed tokens (`resync_draft`).

Streams stay exact through all of it: a request keeps its output and what was sent;
re-admission only changes what the workers are told to prefill.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from specserve_ray.contracts import PrefillItem, StepPlan
from specserve_ray.errors import DeadlineExceededError
from specserve_ray.engine import Request

log = logging.getLogger("specserve_ray")


class StepFailed(RuntimeError):
    """A request could not be finished because of a worker or loop failure (clean error)."""


class RequestTimeout(StepFailed, DeadlineExceededError):
    """A request passed its deadline (config default or its own `timeout_s`)."""


class StepAbandoned(RuntimeError):
    """A step's effect on the workers is unknown (a worker failed mid-step) but nothing
    is wrong with its requests: they are re-admitted with their committed tokens."""


class TargetLost(RuntimeError):
    """The target worker died or hung: every running request must be re-admitted."""


_ISOLATED_TRIES = 2            # a request failing alone this often is failed
_MAX_LOOP_CRASHES = 5          # within _CRASH_WINDOW_S: then the replica is unhealthy
_CRASH_WINDOW_S = 60.0

class Supervision:
    """Fault handling over the AsyncSpecEngine's state (engine, queues, probe, counters)."""

    async def _supervise(self) -> None:
        """Run the loop; restart it after a crash (its requests retried in isolation),
        give up (check_health red) after repeated crashes."""
        while True:
            try:
                await self._loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not freeze every request
                log.exception("step loop crashed; restarting it")
                self.faults.add("loop_restarts")
                now = time.monotonic()
                self._crashes.append(now)
                while self._crashes and now - self._crashes[0] > _CRASH_WINDOW_S:
                    self._crashes.popleft()
                for plan in list(self._in_flight.values()):
                    self.engine.forget_plan(plan)
                    self.engine._to_release.extend(plan.release)
                self._in_flight.clear()
                self._busy.clear()
                if len(self._crashes) > _MAX_LOOP_CRASHES:
                    self._give_up(f"step loop keeps crashing: {exc}")
                    return
                if self._probe is not None:       # it crashed the loop on its own
                    self._fail_request(self._probe, StepFailed(f"request failed: {exc}"))
                    self._probe = None
                self._isolate(list(self.engine.running))

    def _submit_probe(self) -> None:
        """One step with the suspect request alone: its prefill, then one decode step."""
        eng, req = self.engine, self._probe
        others = {r.request_id for r in eng.running if r is not req}
        queued, eng.waiting = eng.waiting, ([] if req in eng.running else [req])
        try:
            plan = eng.plan_step(others)
        finally:
            left, eng.waiting = eng.waiting, queued
        if left or plan is None:     # no slot or nothing to do: back to the normal batch
            eng.waiting[:0] = left
            self._probe = None
            self._wake.set()
            return
        self._probe_plan = plan
        self._launch(plan)

    def _plan_requests(self, plan: StepPlan) -> list[Request]:
        ids = {*plan.decode_ids, *(p.seq_id for p in plan.prefill)}
        return [r for r in self.engine.running if r.request_id in ids]

    def _pull(self, req: Request) -> None:
        """Take a request out of the batch and free its caches on both workers; it keeps
        its committed tokens and re-enters as prompt + output (the stream goes on)."""
        eng = self.engine
        eng.running = [r for r in eng.running if r is not req]
        eng._to_release.append(req.request_id)
        req.unsynced_draft = []
        req.resumed_len, req.num_prefilled = len(req.output_ids), 0
        self.faults.add("resumed_requests")

    def _fail_request(self, req: Request, error: Exception) -> None:
        self.engine.abort(req.request_id)
        self.engine._to_release.append(req.request_id)
        self.faults.add("failed_requests")
        self.streams.fail(req.request_id, error)

    def _isolate(self, reqs: list[Request]) -> None:
        for req in reqs:
            self._pull(req)
            self._suspects.append(req)
            self.faults.add("isolation_retries")
        self._wake.set()

    def _on_step_error(self, plan: StepPlan, exc: Exception, probe: bool) -> None:
        """A step raised (workers alive): its releases travel again; its requests are
        retried one by one, and only one that fails alone is failed."""
        self.faults.add("step_errors")
        self.engine.forget_plan(plan)
        self.engine._to_release.extend(plan.release)
        reqs = self._plan_requests(plan)
        culprit = self._probe if probe else None
        if culprit is not None:
            self._probe = None
            strikes = self._strikes.get(culprit.request_id, 0) + 1
            if strikes >= _ISOLATED_TRIES:   # it failed alone, again: it is the one to fail
                self._strikes.pop(culprit.request_id, None)
                self._fail_request(culprit, StepFailed(f"request failed in its step: {exc}"))
            else:
                self._strikes[culprit.request_id] = strikes
                self._isolate([culprit])
        self._isolate([r for r in reqs if not r.finished and r is not culprit])

    def _readmit_plan(self, plan: StepPlan, probe: bool) -> None:
        self.engine.forget_plan(plan)
        self.engine._to_release.extend(plan.release)
        reqs = [r for r in self._plan_requests(plan) if not r.finished]
        for r in reqs:
            self._pull(r)
        if probe and self._probe is not None:     # it starts its isolated retry again
            self._probe_steps = 0
            reqs = [r for r in reqs if r is not self._probe]
        self.engine.waiting[:0] = reqs
        self._wake.set()

    def _on_target_lost(self, plan: StepPlan) -> None:
        self.engine.forget_plan(plan)
        self.engine._to_release.extend(plan.release)
        if self._target_lost_at is None:
            self._target_lost_at = time.monotonic()
            self.faults.add("target_failures")

    def report_target_lost(self) -> None:
        """A health probe found the target gone (no step needed to notice)."""
        if self._target_lost_at is None and self.fatal is None:
            self._target_lost_at = time.monotonic()
            self.faults.add("target_failures")
            self._wake.set()

    @property
    def target_up(self) -> bool:
        return self._target_lost_at is None and self.fatal is None

    async def _recover_target(self) -> None:
        """Re-admit every running request with its committed tokens, recreate the target
        (bounded), and serve again; if that fails, fail everything cleanly (fatal)."""
        eng = self.engine
        if self._probe is not None:
            self._suspects.appendleft(self._probe)
            self._probe = None
        resumed = [r for r in eng.running if not r.finished]
        for r in resumed:
            self._pull(r)
        suspects = {id(r) for r in self._suspects}
        eng.waiting[:0] = [r for r in resumed if id(r) not in suspects]
        try:
            if self.recover_target is None:
                raise RuntimeError("no way to recreate the target worker")
            await asyncio.wait_for(self.recover_target(), self.fault_cfg.recovery_timeout_s)
        except Exception as exc:  # noqa: BLE001
            log.exception("target recovery failed")
            self._give_up(f"target worker lost and could not be recreated: {exc}")
            return
        self.faults.add("target_restarts")
        self.faults.add("target_recovery_seconds", time.monotonic() - self._target_lost_at)
        self._target_lost_at = None
        self._wake.set()

    def _give_up(self, reason: str) -> None:
        """Unrecoverable: every request ends with a clean error; check_health goes red."""
        self.fatal = reason
        error = StepFailed(reason)
        eng = self.engine
        everyone = [*eng.running, *eng.waiting, *self._suspects]
        if self._probe is not None:
            everyone.append(self._probe)
        self._suspects.clear()
        self._probe = None
        for req in everyone:
            self._fail_request(req, error)

    # -- the draft side (driven by the worker group) ------------------------------------------
    def speculation_down(self) -> None:
        """The draft worker is gone: plan k = 0 (target alone, exact) until resync."""
        if self.draft_up:
            self.draft_up = False
            self.engine.has_draft = False
            self._draft_down_at = time.monotonic()
        self.faults.add("draft_failures")

    async def resync_draft(self, install: Callable[[list[PrefillItem]], Awaitable[None]]) -> None:
        """Between steps: hand a fresh draft every running request's committed tokens
        (`install` prefills them and switches the transport back), then speculate again."""
        async with self.paused():
            items, synced = [], []
            for r in self.engine.running:
                if r.finished or r.num_prefilled == 0:
                    continue
                p = r.params.seq_sampling(self.engine.vocab_size)
                if r.prefill_done:   # all but the last token, which the next step carries
                    items.append(PrefillItem(r.request_id, r.prompt_ids + r.output_ids[:-1], p))
                    synced.append(r)
                else:                # mid chunked prefill: the chunks so far; the rest follow
                    items.append(PrefillItem(r.request_id, r.prefill_ids[:r.num_prefilled], p,
                                             last=False))
            await install(items)
            for r in synced:
                r.unsynced_draft = r.output_ids[-1:]
            self.engine.has_draft = True
            self.draft_up = True
            self.faults.add("draft_restarts")
            if self._draft_down_at is not None:
                self.faults.add("draft_recovery_seconds", time.monotonic() - self._draft_down_at)
                self._draft_down_at = None

    # -- health and drain ------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): for /health; false while the target is down or draining."""
        if self.fatal is not None:
            return False, self.fatal
        if self._target_lost_at is not None:
            return False, "target worker recovering"
        if self.draining:
            return False, "draining"
        return True, "ok"

    def liveness(self) -> None:
        """Raise when the replica cannot recover (Serve's check_health replaces it)."""
        if self.fatal is not None:
            raise RuntimeError(self.fatal)
        if self._task is not None and self._task.done() and not self._task.cancelled():
            raise RuntimeError("the step loop has stopped")

    async def drain(self, timeout_s: float) -> int:
        """Stop admitting; let running and queued requests finish within `timeout_s`;
        returns how many were still unfinished (they end with a clean error)."""
        self.draining = True
        end = time.monotonic() + timeout_s
        eng = self.engine
        while (eng.running or eng.waiting or self._suspects or self._probe) \
                and time.monotonic() < end and self.fatal is None:
            await asyncio.sleep(0.05)
        left = len(eng.running) + len(eng.waiting) + len(self._suspects)
        if left:
            self._give_up("replica shut down before the request finished")
        await self.stop()
        return left
