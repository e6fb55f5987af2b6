"""The draft and target worker actors: thin Ray shells around the engine's hosts.

Each actor loads its model through the engine's runner and keeps the KV caches of the
requests routed to it; a request stays on the same pair of actors for its life.
"""
from __future__ import annotations

import ray

from specserve_ray.config import LimitsConfig, ModelConfig
from specserve_ray.models.runner import ModelRunner
from specserve_ray.workers.draft import DraftWorker
from specserve_ray.contracts import DraftOutput, StepPlan, StepResult
from specserve_ray.workers.host import run_draft, run_target
from specserve_ray.workers.target import TargetWorker


class _Base:
    def __init__(self, model: dict, limits: dict, role: str):
        model_cfg, lim = ModelConfig(**model), LimitsConfig(**limits)
        self.runner, self.tokenizer = ModelRunner.from_config(
            model_cfg, lim.max_num_seqs, lim.max_model_len, name=role)

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
                "num_seqs": self.runner.num_seqs()}


@ray.remote
class DraftActor(_Base):
    def __init__(self, model: dict, limits: dict):
        super().__init__(model, limits, "draft")
        self.worker = DraftWorker(self.runner)

    def step(self, plan: StepPlan) -> DraftOutput:
        return run_draft(self.worker, plan)


@ray.remote
class TargetActor(_Base):
    def __init__(self, model: dict, limits: dict, synthetic_acceptance_rate: float | None = None):
        super().__init__(model, limits, "target")
        self.worker = TargetWorker(self.runner, synthetic_acceptance_rate)

    def step(self, draft_out: DraftOutput) -> StepResult:
        return run_target(self.worker, draft_out)

    def step_without_draft(self, plan: StepPlan) -> StepResult:
        # run_draft with no worker packs the plan's fixed (n-gram) drafts, if any.
        return run_target(self.worker, run_draft(None, plan))
