"""How many router replicas the load calls for (pure; Serve's adapter is
deployments/autoscaling.py).

Each router replica owns one draft and one target worker (its placement group), so this
number scales whole draft + target + router groups. Two reasons to have more:

- Demand: running + queued requests over `target_utilization` of one replica's batch
  slots. Keeping batches under the slot count leaves headroom for bursts and keeps
  batches in the range where speculation still pays (the controller cuts speculation
  first, within seconds; replicas take minutes to add, so they answer sustained load).
- Latency: decode steps slower than the tightest TPOT budget while batches are at least
  half full. Smaller batches per replica shorten steps; when batches are small, more
  replicas would not help, so latency alone never scales an idle-ish app up.

Scale-down needs no special case: demand falls, the desired count falls, and Serve's
`downscale_delay_s` supplies the hysteresis (as `upscale_delay_s` does for scale-up).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ReplicaLoad", "desired_replicas"]


@dataclass(frozen=True)
class ReplicaLoad:
    """One router replica's signals (means over Serve's look-back window)."""

    running: float = 0.0
    queue_depth: float = 0.0
    capacity: float = 1.0               # batch slots (max_num_seqs)
    step_s: float | None = None         # mean decode step seconds; None = no decode steps
    tpot_budget_s: float = math.inf     # tightest TPOT budget among its requests


def desired_replicas(loads: Sequence[ReplicaLoad], current: int, *, handle_queued: float = 0.0,
                     target_utilization: float = 0.75, latency_min_utilization: float = 0.5) -> int:
    """Replicas wanted for this load (Serve then applies min/max and the delays)."""
    if not 0 < target_utilization <= 1:
        raise ValueError("target_utilization must be in (0, 1]")
    if not loads:
        return current
    capacity = sum(r.capacity for r in loads) / len(loads)
    demand = sum(r.running + r.queue_depth for r in loads) + max(handle_queued, 0.0)
    wanted = math.ceil(demand / (target_utilization * max(capacity, 1.0)))
    slow = [r for r in loads if r.step_s is not None and r.step_s > r.tpot_budget_s
            and r.running >= latency_min_utilization * r.capacity]
    if slow:
        wanted = max(wanted, current + 1)
    return max(wanted, 1 if demand > 0 else 0)
