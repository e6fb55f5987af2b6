"""Where a step's time goes outside the model forwards: pure arithmetic on timestamps.

A step as the router runs it: plan -> launch -> [hop to the draft] draft work -> [hop to
the target] target work -> [hop back] -> the loop notices -> apply (commit, detokenize,
hand the deltas to the streams). The actor shells stamp `time.monotonic()` when they enter
and leave their step (`StepResult.marks`); the router stamps the launch and the return.
Those stamps compare across processes of one host (CLOCK_MONOTONIC). Across hosts only the
sum of the hops is meaningful (clock offsets cancel), so `hops` keeps the split only when
every hop came out non-negative.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepTiming:
    """Router-side times of one step, seconds."""

    plan: float = 0.0          # scheduler.plan_step
    apply: float = 0.0         # scheduler.apply_step + handing outputs to the streams
    loop_wait: float = 0.0     # asyncio: launch -> task runs, result -> loop applies it
    # Ray calls, (de)serialization and queueing between router and actors; None in-process.
    transport: float | None = None
    to_draft: float | None = None
    draft_to_target: float | None = None
    to_router: float | None = None
    worker_busy: float | None = None   # time inside the actors' step methods (both)


def hop_times(started: float, returned: float, marks) -> StepTiming:
    """Transport split from the router's stamps (`started` when the execution began,
    `returned` when its result arrived) and the actors' `marks` (draft in, draft out,
    target in, target out; draft ones None when the target ran alone)."""
    if marks is None:
        return StepTiming()
    d_in, d_out, t_in, t_out = marks
    if d_in is None or d_out is None:
        busy = t_out - t_in
        hops = (t_in - started, None, returned - t_out)
    else:
        busy = (d_out - d_in) + (t_out - t_in)
        hops = (d_in - started, t_in - d_out, returned - t_out)
    transport = max(0.0, (returned - started) - busy)
    split = hops if all(h is None or h >= 0 for h in hops) else (None, None, None)
    return StepTiming(transport=transport, to_draft=split[0], draft_to_target=split[1],
                      to_router=split[2], worker_busy=busy)
