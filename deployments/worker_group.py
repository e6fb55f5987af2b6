"""The replica's worker actors: created in its placement group, watched, recreated.

`WorkerGroup` owns the draft and target actors and the transport over them, and is the
step loop's `execute`:

- a draft that raises, dies or misses the step deadline: the step is finished by the
  target alone (`step_without_draft`, exact: k = 0), the draft is killed and recreated
  in its bundle in the background, the running requests' committed tokens are prefilled
  into it (`AsyncSpecEngine.resync_draft`), and speculation resumes. No request sees it.
- a target that dies or hangs: `TargetLost` goes up to the step loop, which re-admits
  every running request and calls `recover_target` (kill, recreate, rebuild transport).
- a target that raises (alive): the error goes up; the loop retries requests alone.

Recreated workers get no injected faults (specserve_ray/faults.py), so a test's `die`
fires once. Ray's own `max_restarts` is 0: a restarted actor would come back empty
(no caches), which is no better than a new one, and recreation keeps it explicit.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specserve_ray.async_engine import StepAbandoned, TargetLost
from specserve_ray.config import AppConfig
from specserve_ray.contracts import StepPlan, StepResult
from specserve_ray.faults import role_faults

from deployments.transport import ActorTransport, CompiledGraphTransport, WorkerFault
from deployments.workers import DraftActor, TargetActor

log = logging.getLogger("specserve_ray")
_DRAFT_BUNDLE, _TARGET_BUNDLE = 1, 2
_MAX_BACKOFF_S = 60.0


def actor_options(resources: dict[str, float], bundle_index: int, pg=None) -> dict:
    res = dict(resources)
    opts: dict[str, Any] = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0)}
    if res:
        opts["resources"] = res
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=False)
    return opts


async def _get(ref, timeout: float):
    async def wait():
        return await ref
    return await asyncio.wait_for(wait(), timeout)


class WorkerGroup:
    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self._pg = ray.util.get_current_placement_group()
        self._limits = cfg.engine.limits.model_dump()
        inject = cfg.faults.inject
        self.target = self._new_target(role_faults(inject, "target"))
        self.draft = (self._new_draft(role_faults(inject, "draft"))
                      if cfg.engine.draft is not None else None)
        self.draft_up = self.draft is not None
        self.transport = None
        self.target_info: dict = {}     # TargetActor.describe(), set by the builder
        self.serving = None              # the AsyncSpecEngine, set by attach()
        self._draft_task: asyncio.Task | None = None
        self._closed = False

    # -- creation ---------------------------------------------------------------------------
    def _new_target(self, faults: list[dict]):
        eng = self.cfg.engine
        return TargetActor.options(**actor_options(
            self.cfg.target_resources, _TARGET_BUNDLE, self._pg)).remote(
            eng.target.model_dump(), self._limits, eng.speculation.synthetic_acceptance_rate,
            faults)

    def _new_draft(self, faults: list[dict]):
        return DraftActor.options(**actor_options(
            self.cfg.draft_resources, _DRAFT_BUNDLE, self._pg)).remote(
            self.cfg.engine.draft.model_dump(), self._limits, faults)

    def describe(self) -> dict:
        """The target's vocabulary info, after checking the draft shares it (start-up)."""
        target_info = ray.get(self.target.describe.remote())
        if self.draft is not None:
            draft_info = ray.get(self.draft.describe.remote())
            if (draft_info["vocab_size"] != target_info["vocab_size"]
                    or draft_info["vocab"] != target_info["vocab"]):
                raise ValueError("draft and target tokenizers differ; speculative decoding "
                                 "needs one shared vocabulary")
        return target_info

    def _build_transport(self) -> None:
        draft = self.draft if self.draft_up else None
        compiled = self.cfg.transport == "compiled_graph"
        if compiled and (draft is not None or self.cfg.engine.draft is None):
            self.transport = CompiledGraphTransport(draft, self.target)
        else:   # while the draft is down a compiled graph falls back to plain actor calls
            self.transport = ActorTransport(draft, self.target)

    def attach(self, serving) -> None:
        self.serving = serving
        serving.recover_target = self.recover_target
        self._build_transport()

    # -- the step ---------------------------------------------------------------------------
    async def execute(self, plan: StepPlan, timeout: float | None = None) -> StepResult:
        transport = self.transport
        try:
            return await transport.execute(plan, timeout)
        except WorkerFault as fault:
            if fault.role == "target":
                if fault.kind == "raised":
                    raise
                raise TargetLost(str(fault)) from fault
            draft_fault = fault
            self._draft_lost(transport, fault)
            if self.serving is not None:
                self.serving.faults.add("draft_fallback_steps")
            if not fault.target_untouched:
                # The target may have run this step (a graph, a draft that answered too
                # late): running it again would commit twice. Its requests are re-admitted.
                raise StepAbandoned(str(fault)) from fault
        # The same step again on the target alone (the failed one never reached it).
        try:
            result = await self.transport.execute(plan, timeout)
        except WorkerFault as fault:
            if fault.role == "target" and fault.kind == "raised":
                raise
            raise TargetLost(str(fault)) from fault
        return replace(result, draft_error=str(draft_fault))

    # -- draft: degrade, recreate, resync ---------------------------------------------------
    def _draft_lost(self, transport, fault: WorkerFault) -> None:
        """Switch to target-only steps at once; recreate the draft in the background."""
        if transport is not self.transport or not self.draft_up:
            return                       # a second in-flight step saw the same failure
        log.warning("draft worker failed (%s); target-only decoding until it is back", fault)
        self.draft_up = False
        old = self.draft
        transport.teardown()
        try:
            ray.kill(old, no_restart=True)   # a stuck draft must not run this step later
        except Exception:  # noqa: BLE001
            pass
        self._build_transport()
        if self.serving is not None:
            self.serving.speculation_down()
        if self._draft_task is None or self._draft_task.done():
            self._draft_task = asyncio.get_running_loop().create_task(self._recover_draft())

    async def _recover_draft(self) -> None:
        cfg = self.cfg.faults
        backoff = cfg.draft_restart_backoff_s
        while not self._closed:
            await asyncio.sleep(backoff)
            new = self._new_draft([])
            try:
                await _get(new.ready.remote(), cfg.recovery_timeout_s)
                await self.serving.resync_draft(lambda items: self._install_draft(new, items))
                log.warning("draft worker recreated; speculation resumed")
                return
            except Exception:  # noqa: BLE001 - keep serving target-only, try again later
                log.exception("recreating the draft worker failed; retrying in %.1f s", backoff)
                try:
                    ray.kill(new, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
                backoff = min(max(backoff, 0.5) * 2, _MAX_BACKOFF_S)

    async def _install_draft(self, new, items: list) -> None:
        """Under the step loop's pause: prefill the fresh draft, then speculate again."""
        await _get(new.resync.remote(items), self.cfg.faults.actor_call_timeout_s)
        self.transport.teardown()
        self.draft, self.draft_up = new, True
        self._build_transport()

    # -- target: recreate ------------------------------------------------------------------
    async def recover_target(self) -> None:
        """Kill what is left of the target and start a fresh one in its bundle (the step
        loop re-admits the requests; the caller bounds the time)."""
        self.transport.teardown()
        try:
            ray.kill(self.target, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        self.target = self._new_target([])
        await _get(self.target.ready.remote(), self.cfg.faults.recovery_timeout_s)
        self._build_transport()
        log.warning("target worker recreated; re-admitted requests continue")

    # -- health ---------------------------------------------------------------------------
    async def check(self) -> None:
        """Liveness probe of both workers between steps: a dead one is handled as if a
        step had found it (an idle replica recovers too). Raises only when the replica
        cannot recover (Serve then replaces it)."""
        serving = self.serving
        serving.liveness()
        timeout = self.cfg.faults.actor_call_timeout_s
        if serving.target_up:
            try:
                await _get(self.target.ready.remote(), timeout)
            except Exception as exc:  # noqa: BLE001
                log.error("target worker failed its health check: %s", exc)
                serving.report_target_lost()
        if self.draft_up and self.draft is not None:
            try:
                await _get(self.draft.ready.remote(), timeout)
            except Exception as exc:  # noqa: BLE001
                self._draft_lost(self.transport, WorkerFault("draft", "died", str(exc)[:200]))

    async def arm_fault(self, fault) -> int:
        """Arm one injected fault (FaultSpecConfig) on the live worker of its role."""
        actor = self.target if fault.role == "target" else self.draft
        if actor is None or (fault.role == "draft" and not self.draft_up):
            raise RuntimeError(f"no live {fault.role} worker to inject a fault into")
        return await _get(actor.arm_faults.remote([fault.model_dump()]), 30)

    async def pids(self) -> dict:
        out = {"target": await _get(self.target.pid.remote(), 30)}
        if self.draft is not None and self.draft_up:
            out["draft"] = await _get(self.draft.pid.remote(), 30)
        return out

    async def worker_stats(self) -> dict:
        timeout = self.cfg.faults.actor_call_timeout_s
        out = {"target": await _get(self.target.forward_stats.remote(), timeout)}
        out["draft"] = (await _get(self.draft.forward_stats.remote(), timeout)
                        if self.draft is not None and self.draft_up
                        else {"forward_calls": 0, "forward_seconds": 0.0, "num_seqs": 0})
        return out

    def shutdown(self) -> None:
        self._closed = True
        if self._draft_task is not None:
            self._draft_task.cancel()
        if self.transport is not None:
            self.transport.teardown()
        for actor in (self.draft, self.target):
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
