"""An ideal single-server queue (pure): what queueing alone does to time to first token.

`bench load` judges TTFT under load against single-stream TTFT. Part of any gap is the
queue itself: a prompt that arrives while others are being prefilled waits for them,
however good the scheduler. `waits` computes those waits for a server that runs one job
at a time, never idles while a job is queued, and never preempts (prefill in arrival
order, or a non-preemptive priority), so a measured TTFT can be set beside what an ideal
server of the same speed would give (scripts/load_bound.py).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def waits(arrivals: Sequence[float], service: Sequence[float],
          order: Callable[[int], float] | None = None) -> np.ndarray:
    """Seconds each job waits before the server starts it.

    `arrivals` sorted ascending; `service[j]` the seconds job j holds the server; `order`
    the key of the next job among those queued when the server frees (default: arrival,
    first come first served; e.g. the job's size for shortest first)."""
    arrivals, service = np.asarray(arrivals, float), np.asarray(service, float)
    if arrivals.shape != service.shape:
        raise ValueError("one service time per arrival")
    if np.any(np.diff(arrivals) < 0) or np.any(service < 0):
        raise ValueError("arrivals must be sorted and service times non-negative")
    key = order or (lambda j: j)
    n = len(arrivals)
    wait = np.zeros(n)
    free_at, queued, nxt = 0.0, [], 0
    for _ in range(n):
        if not queued:                       # idle until the next arrival
            free_at = max(free_at, arrivals[nxt])
        while nxt < n and arrivals[nxt] <= free_at:
            queued.append(nxt)
            nxt += 1
        j = min(queued, key=key)
        queued.remove(j)
        wait[j] = free_at - arrivals[j]
        free_at += service[j]
    return wait
