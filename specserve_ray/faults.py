"""Test-only fault injection inside the worker actors (raise, stall or die on a step).

The router passes a worker the faults meant for its role when it creates the worker's
*first* incarnation; a recreated worker gets none, so a `die` fault fires once and
recovery can be observed. Config validation refuses faults unless
`faults.allow_fault_injection` is set (specserve_ray/config.py), so shipped configs
cannot turn this on.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass


class InjectedFault(RuntimeError):
    """Raised by a worker on purpose (fault injection)."""


@dataclass(frozen=True)
class Fault:
    action: str                    # "raise" | "stall" | "die"
    at_step: int | None = None     # 1-based step call of this incarnation
    request: str | None = None     # or: any step carrying a sequence id with this prefix
    stall_s: float = 5.0
    token: int | None = None       # or: any step carrying a sequence whose prompt held it


class FaultInjector:
    """Counts a worker's step calls and fires the matching faults (pure but for `fire`)."""

    def __init__(self, faults: list[dict] | None = None):
        self.faults = [Fault(f["action"], f.get("at_step"), f.get("request"),
                             f.get("stall_s", 5.0), f.get("token")) for f in (faults or [])]
        self.steps = 0
        self.marked: set[str] = set()    # sequences whose prompt held a fault's token

    def arm(self, faults: list[dict]) -> None:
        """Add faults at run time; `at_step` counts from now (tests of a running app)."""
        for f in faults:
            at = f.get("at_step")
            self.faults.append(Fault(f["action"], None if at is None else self.steps + at,
                                     f.get("request"), f.get("stall_s", 5.0), f.get("token")))

    def due(self, seq_ids: list[str], prefill: list | None = None) -> list[Fault]:
        """Advance the step count; the faults this step triggers. `prefill`: the plan's
        PrefillItems (token triggers look into their prompts)."""
        self.steps += 1
        if not self.faults:
            return []
        tokens = {f.token for f in self.faults if f.token is not None}
        for item in prefill or ():
            if tokens.intersection(item.prompt_ids):
                self.marked.add(item.seq_id)
        marked = self.marked.intersection(seq_ids)
        return [f for f in self.faults
                if f.at_step == self.steps
                or (f.request is not None and any(s.startswith(f.request) for s in seq_ids))
                or (f.token is not None and marked)]

    def on_step(self, role: str, seq_ids: list[str], prefill: list | None = None) -> None:
        for fault in self.due(seq_ids, prefill):
            fire(role, fault, self.steps)


def fire(role: str, fault: Fault, step: int) -> None:
    if fault.action == "stall":
        time.sleep(fault.stall_s)
    elif fault.action == "die":
        os._exit(1)             # a crash: no cleanup, like an OOM kill
    else:
        raise InjectedFault(f"injected fault: {role} raised on step {step}")


def role_faults(inject, role: str) -> list[dict]:
    """The configured faults (FaultSpecConfig models) meant for one role, as dicts."""
    return [f.model_dump() for f in inject if f.role == role]
