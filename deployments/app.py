"""`build_app(args) -> Application`: the SpecServe-Ray Serve application.

    HTTP :8000 (OpenAI API) ─┐
    gRPC :9000 (SpecServe) ──┼──> SpecRouter replica ── placement group (STRICT_PACK) ──┐
    DeploymentHandle ────────┘     step loop, batching  │ bundle 0: router             │
                                   one compiled-graph   │ bundle 1: DraftActor  (draft)│
                                   execution per step:  │ bundle 2: TargetActor (target)
                                   draft.step -> target.step (all running requests)   │
                                                        └──────────────────────────────┘
Use as `import_path: deployments.app:build_app` in a Serve config; `args` are validated
by `specserve_ray.config.AppConfig`. More replicas (or Serve autoscaling) add whole
router+draft+target groups.

Queueing: Serve's `max_ongoing_requests` should be >= `engine.limits.max_num_seqs +
max_queued_requests`, so that the router's own queue bound (429 with Retry-After)
refuses before Serve starts queueing requests on its own; build_app refuses a config
that breaks this (ValueError naming the keys and values), and so does a replica whose
deployment settings or user_config break it (deployments/router.py).
"""
from __future__ import annotations

from ray.serve import Application

from specserve_ray.config import AppConfig
from specserve_ray.front_config import check_serve_queue

from deployments.router import SpecRouter


def build_app(args: dict | None = None) -> Application:
    cfg = AppConfig.model_validate(args or {})
    check_serve_queue(cfg.max_ongoing_requests, cfg.engine.limits.max_num_seqs,
                      cfg.max_queued_requests, "app args")
    bundles = [cfg.router_resources, cfg.draft_resources, cfg.target_resources]
    router_cpus = cfg.router_resources.get("CPU", 0.0)
    return SpecRouter.options(
        placement_group_bundles=bundles,
        placement_group_strategy=cfg.placement_strategy,
        ray_actor_options={"num_cpus": router_cpus,
                           "num_gpus": cfg.router_resources.get("GPU", 0.0)},
        max_ongoing_requests=cfg.max_ongoing_requests,
    ).bind(cfg.model_dump(mode="json"))
