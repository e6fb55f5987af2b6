"""The draft and target worker actors: thin Ray shells around the engine's hosts.

Each actor loads its model through the engine's runner and keeps the KV caches of the
requests routed to it; a request stays on the same pair of actors for its life.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import ray

from specserve_ray.config import LimitsConfig, ModelConfig
from specserve_ray.faults import FaultInjector
from specserve_ray.models.runner import ModelRunner
from specserve_ray.workers.draft import DraftWorker
from specserve_ray.contracts import DraftOutput, StepPlan, StepResult
from specserve_ray.workers.host import run_draft, run_target
from specserve_ray.workers.target import TargetWorker

from deployments import wire


def _seq_ids(plan: StepPlan) -> list[str]:
    return [*plan.decode_ids, *(p.seq_id for p in plan.prefill)]


class _Base:
    def __init__(self, model: dict, limits: dict, role: str, faults: list[dict] | None = None):
        wire.install()      # tensors in step messages travel as numpy (deployments/wire.py)
        model_cfg, lim = ModelConfig(**model), LimitsConfig(**limits)
        self.role = role
        self.runner, self.tokenizer = ModelRunner.from_config(
            model_cfg, lim.max_num_seqs, lim.max_model_len, name=role)
        self.faults = FaultInjector(faults)   # tests only; empty = a counter, nothing else
        self._step_started: float | None = None

    def _enter_step(self, plan: StepPlan) -> float:
        """Mark the step's start (the watchdog's `in_step`, the router's hop times)."""
        self._step_started = time.monotonic()
        self.faults.on_step(self.role, _seq_ids(plan), plan.prefill)
        return self._step_started

    def arm_faults(self, faults: list[dict]) -> int:
        """Tests only (the router refuses unless faults.allow_fault_injection)."""
        self.faults.arm(faults)
        return self.faults.steps

    def in_step(self) -> float | None:
        """Seconds the current step has run, None between steps (the router's watchdog
        asks, to tell a stuck worker from a waiting one)."""
        return None if self._step_started is None else time.monotonic() - self._step_started

    def pid(self) -> int:
        """This worker's process id (tests kill it for real)."""
        return os.getpid()

    def reconcile(self, live: list[str]) -> int:
        """Release every sequence the router no longer runs (after a failed step);
        returns how many were freed."""
        keep = set(live)
        stale = [s for s in list(self.runner._seqs) if s not in keep]   # runner owns the slots
        self.worker.release(stale)
        return len(stale)

    def describe(self) -> dict:
        return {"vocab_size": self.runner.vocab_size, "vocab": self.tokenizer.get_vocab(),
                "dtype": str(self.runner.dtype), "device": str(self.runner.device)}

    def ready(self) -> bool:
        return True

    def profile(self, kind: str, grid: list, repeats: int = 2, budget_s: float = 5.0) -> list:
        """Time this actor's forwards over `grid` (scratch sequences; see profile_runner)."""
        from specserve_ray.policy.profile import profile_runner

        return profile_runner(self.runner, kind, [tuple(p) for p in grid], repeats, budget_s)

    def forward_stats(self) -> dict:
        return {"forward_calls": self.runner.forward_calls,
                "forward_seconds": self.runner.forward_seconds,
                "num_seqs": self.runner.num_seqs(), "steps": self.faults.steps}


@ray.remote(max_restarts=0)    # the router's WorkerGroup recreates a lost worker itself
class DraftActor(_Base):
    def __init__(self, model: dict, limits: dict, faults: list[dict] | None = None):
        super().__init__(model, limits, "draft", faults)
        self.worker = DraftWorker(self.runner)

    def step(self, plan: StepPlan) -> DraftOutput:
        try:
            entered = self._enter_step(plan)
            out = run_draft(self.worker, plan)
            return replace(out, marks=(entered, time.monotonic()))
        finally:
            self._step_started = None

    def resync(self, items: list) -> int:
        """Prefill running requests into a fresh draft (prompt + committed output, bar
        the last token, which the next step's `new_tokens` carries)."""
        self.worker.release([i.seq_id for i in items])
        self.worker.prefill(items)
        return self.runner.num_seqs()


@ray.remote(max_restarts=0)
class TargetActor(_Base):
    def __init__(self, model: dict, limits: dict, synthetic_acceptance_rate: float | None = None,
                 faults: list[dict] | None = None):
        super().__init__(model, limits, "target", faults)
        self.worker = TargetWorker(self.runner, synthetic_acceptance_rate)

    def step(self, draft_out: DraftOutput) -> StepResult:
        try:
            entered = self._enter_step(draft_out.plan)
            result = run_target(self.worker, draft_out)
            return replace(result, marks=(*(draft_out.marks or (None, None)), entered,
                                          time.monotonic()))
        finally:
            self._step_started = None

    def step_without_draft(self, plan: StepPlan) -> StepResult:
        """Plain decoding (k = 0 for every row): exact, and the fallback while the draft
        worker is down. run_draft with no worker packs the plan's fixed (n-gram) drafts."""
        try:
            entered = self._enter_step(plan)
            result = run_target(self.worker, run_draft(None, plan))
            return replace(result, marks=(None, None, entered, time.monotonic()))
        finally:
            self._step_started = None
