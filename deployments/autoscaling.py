"""Ray Serve custom autoscaling policy for SpecRouter, driven by the router's own signals.

Use in a Serve config (Ray >= 2.51 has `autoscaling_config.policy`; this is 2.60):

    deployments:
      - name: SpecRouter
        autoscaling_config:
          min_replicas: 1
          max_replicas: 4
          upscale_delay_s: 30
          downscale_delay_s: 300
          policy:
            policy_function: deployments.autoscaling:SpecAutoscalingPolicy
            policy_kwargs: {target_utilization: 0.75}

Each replica's `record_autoscaling_stats()` (SpecRouter) hands Serve its running batch,
queue depth, batch slots, mean decode step time and tightest TPOT budget; Serve averages
them over `look_back_period_s` per replica and calls this policy in its controller. The
decision itself is the pure `desired_replicas` (specserve_ray/policy/replicas.py); Serve
applies min/max replicas, scaling factors and the up/down delays on top.
"""
from __future__ import annotations

import math
from typing import Any

from specserve_ray.policy.replicas import ReplicaLoad, desired_replicas

STATS = ("running", "queue_depth", "capacity", "step_s", "tpot_budget_s")


def loads_from_metrics(aggregated: dict | None) -> list[ReplicaLoad]:
    """{metric: {replica: value}} -> one ReplicaLoad per replica that reported them all.
    `step_s` <= 0 means no decode steps and `tpot_budget_s` <= 0 no budget (Serve's
    custom metrics must be plain numbers)."""
    if not aggregated or any(name not in aggregated for name in STATS):
        return []
    loads = []
    for replica in aggregated["running"]:
        try:
            v = {name: float(aggregated[name][replica]) for name in STATS}
        except (KeyError, TypeError, ValueError):
            continue
        loads.append(ReplicaLoad(v["running"], v["queue_depth"], max(v["capacity"], 1.0),
                                 v["step_s"] if v["step_s"] > 0 else None,
                                 v["tpot_budget_s"] if v["tpot_budget_s"] > 0 else math.inf))
    return loads


class SpecAutoscalingPolicy:
    """Class-callable policy: Serve instantiates it once with `policy_kwargs`."""

    def __init__(self, target_utilization: float = 0.75, latency_min_utilization: float = 0.5):
        self.target_utilization = target_utilization
        self.latency_min_utilization = latency_min_utilization

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        loads = loads_from_metrics(ctx.aggregated_metrics)
        if not loads:
            # No router signals yet (replicas starting): keep the current target.
            return ctx.target_num_replicas, {}
        queued = ctx.total_queued_requests or 0.0   # waiting at handles, before any router
        wanted = desired_replicas(loads, ctx.current_num_replicas, handle_queued=queued,
                                  target_utilization=self.target_utilization,
                                  latency_min_utilization=self.latency_min_utilization)
        return wanted, {"last_desired": wanted}
