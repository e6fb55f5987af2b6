"""Wiring of one router replica: worker actors, transport, engine, front door, telemetry.

    start_workers(cfg)  ->  WorkerGroup(draft actor, target actor, transport, target_info)
                            (the one place that owns the replica's actors: creation,
                            health, recreation; deployments/worker_group.py)
    build_serving(cfg, workers)  ->  Serving(engine, loop, front door, telemetry)

The router deployment (deployments/router.py) calls these once in its constructor and
only routes calls afterwards.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from specserve_ray.api.auth import load_keys
from specserve_ray.api.front import FrontDoor
from specserve_ray.async_engine import AsyncSpecEngine
from specserve_ray.config import AppConfig, SpeculationConfig
from specserve_ray.engine import SpecEngine
from specserve_ray.front_config import check_serve_queue
from specserve_ray.policy import CostModel

from deployments.controller import controller_name
from deployments.telemetry import RouterTelemetry
from deployments.worker_group import WorkerGroup

log = logging.getLogger("specserve_ray")


# -- worker actors and transport ------------------------------------------------------------
def start_workers(cfg: AppConfig) -> WorkerGroup:
    """Create the draft and target actors in the replica's placement group (bundles 1, 2),
    check they share a vocabulary; the group recreates them when lost and builds the
    configured transport over them (deployments/worker_group.py)."""
    workers = WorkerGroup(cfg)
    workers.target_info = workers.describe()
    return workers


# -- cost model (adaptive policies) ---------------------------------------------------------
@ray.remote(num_cpus=0)
def _fit_cost_model_task(target, draft, spec: dict, limits: dict, key: str) -> dict:
    """Profile the worker actors (bounded) unless the fitted model is cached; a task so
    that both start-up (sync) and reconfigure (async) can wait on it."""
    from specserve_ray.policy.profile import load_or_profile, profile_cost_model

    def verify(grid, budget):
        return ray.get(target.profile.remote("verify", grid, 2, budget))

    draft_fn = None
    if draft is not None:
        def draft_fn(grid, budget):
            return ray.get(draft.profile.remote("draft", grid, 2, budget))

    model = load_or_profile(None, key, lambda: profile_cost_model(
        verify, draft_fn, limits["max_num_seqs"], spec["num_speculative_tokens"],
        limits["max_model_len"], spec["profile_budget_s"]))
    return model.to_dict()


def fit_cost_model(cfg: AppConfig, workers: WorkerGroup, spec: SpeculationConfig):
    """An ObjectRef to the fitted CostModel's dict (cached on disk by the task)."""
    from specserve_ray.policy.profile import cost_model_key

    eng = cfg.engine
    key = cost_model_key(eng.target.path, eng.draft.path if eng.draft else None,
                         eng.target.dtype, eng.target.device)
    return _fit_cost_model_task.remote(workers.target,
                                       workers.draft if workers.draft_up else None,
                                       spec.model_dump(), eng.limits.model_dump(), key)


def persist_learned(cfg: AppConfig, engine: SpecEngine) -> None:
    """Resume what the policies learned in an earlier run and keep saving it beside the
    cached profile (policy/learned.py); never under synthetic acceptance (it would lie)."""
    from specserve_ray.policy.profile import attach_persistence, cost_model_key

    eng = cfg.engine
    if eng.speculation.synthetic_acceptance_rate is None:
        attach_persistence(engine.chooser, None, cost_model_key(
            eng.target.path, eng.draft.path if eng.draft else None, eng.target.dtype,
            eng.target.device))


# -- Serve's queueing rule ------------------------------------------------------------------
def deployed_max_ongoing(cfg: AppConfig) -> int:
    """The replica's real max_ongoing_requests (a Serve config's deployment settings may
    override what build_app set from the args); the args' value outside a replica."""
    try:
        return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
    except Exception:  # noqa: BLE001 - outside a replica (direct construction in tests)
        return cfg.max_ongoing_requests


def check_queueing(cfg: AppConfig, max_num_seqs: int, max_queued_requests: int,
                   where: str) -> None:
    """ValueError unless Serve lets every request the front door may hold (running +
    waiting) reach the replica, so that the project's bound refuses first."""
    check_serve_queue(deployed_max_ongoing(cfg), max_num_seqs, max_queued_requests, where)


# -- the router's library objects -----------------------------------------------------------
@dataclass
class Serving:
    engine: SpecEngine             # plan/apply (router side, no models)
    loop: AsyncSpecEngine          # the step loop over the transport
    front: FrontDoor               # limits, admission, ids, errors for every front door
    telemetry: RouterTelemetry
    tokenizer: Any
    cost_model: CostModel | None


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_serving(cfg: AppConfig, workers: WorkerGroup) -> Serving:
    eng_cfg = cfg.engine
    tokenizer = _load_tokenizer(eng_cfg.target.path)
    cost_model = None
    if eng_cfg.speculation.needs_cost_model:   # only adaptive policies need a profile
        cost_model = CostModel.from_dict(ray.get(fit_cost_model(cfg, workers,
                                                                eng_cfg.speculation)))
    engine = SpecEngine.remote(tokenizer, workers.target_info["vocab_size"],
                               workers.draft is not None, eng_cfg.limits, eng_cfg.speculation,
                               cost_model=cost_model, slo=eng_cfg.slo)
    if cost_model is not None:
        persist_learned(cfg, engine)
    loop = AsyncSpecEngine(engine, workers.execute, max_queued=cfg.max_queued_requests,
                           pipeline=cfg.pipeline, faults=cfg.faults)
    workers.attach(loop)      # the group drives draft fallback/resync and target recovery
    # The front door tokenizes on its own thread, so it gets its own tokenizer instance.
    front = FrontDoor(loop, _load_tokenizer(eng_cfg.target.path), cfg.front,
                      cfg.max_queued_requests, load_keys(key_file=cfg.front.api_key_file))
    if front.auth.enabled:
        log.info("API keys required on HTTP and gRPC (/health stays open)")
    return Serving(engine, loop, front, make_telemetry(loop, cfg), tokenizer, cost_model)


def make_telemetry(serving: AsyncSpecEngine, cfg: AppConfig) -> RouterTelemetry:
    """Metrics export + controller reports for this replica, started on the running loop."""
    from deployments.metrics import RayMetricsExporter

    try:
        ctx = serve.get_replica_context()
        router_id, app = ctx.replica_tag, ctx.app_name
    except Exception:  # noqa: BLE001 - outside a replica (direct construction in tests)
        router_id, app = f"router-{id(serving):x}", None
    telemetry = RouterTelemetry(serving, cfg.signals, router_id, controller_name(app),
                                RayMetricsExporter() if cfg.signals.export_metrics else None)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return telemetry         # check_health starts it on the replica's loop
    telemetry.start()
    return telemetry
