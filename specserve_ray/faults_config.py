"""Faults and recovery config: deadlines, worker restarts, drain, test-only fault injection.

`AppConfig.faults` (the `faults:` section of the app args); what each field does is in
specserve_ray/supervision.py and deployments/worker_group.py.
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FaultSpecConfig(_Strict):
    """One injected fault (tests only): `role` worker does `action` on its `at_step`-th
    step call (1-based, counted per actor incarnation), or on every step that carries a
    sequence whose id starts with `request`."""

    role: Literal["draft", "target"]
    action: Literal["raise", "stall", "die"]
    at_step: int | None = Field(None, ge=1)
    request: str | None = Field(None, min_length=1)
    token: int | None = Field(None, ge=0, description="Fire on every step carrying a "
                              "sequence whose prompt held this token id.")
    stall_s: float = Field(5.0, gt=0, le=600)

    @model_validator(mode="after")
    def _one_trigger(self):
        if sum(x is not None for x in (self.at_step, self.request, self.token)) != 1:
            raise ValueError("a fault needs exactly one trigger: at_step, request or token")
        return self


def parse_fault_env(text: str) -> list[dict]:
    """`SPECSERVE_FAULTS`: comma-separated `role:action@N[:stall_s]` (N = step number) or
    `role:action@req=PREFIX`, e.g. `draft:die@20,target:stall@5:3`."""
    faults = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            head, trigger = part.split("@", 1)
            role, action = head.split(":", 1)
            fields = trigger.split(":")
            spec: dict = {"role": role, "action": action}
            if fields[0].startswith("req="):
                spec["request"] = fields[0][4:]
            else:
                spec["at_step"] = int(fields[0])
            if len(fields) > 1:
                spec["stall_s"] = float(fields[1])
        except ValueError:
            raise ValueError(f"SPECSERVE_FAULTS entry {part!r} is not role:action@N[:stall_s] "
                             "or role:action@req=PREFIX") from None
        faults.append(spec)
    return faults


class FaultsConfig(_Strict):
    """Deadlines, restarts and drain; plus fault injection, refused unless allowed."""

    step_timeout_s: float = Field(60.0, gt=0, description="Watchdog floor for one step: a "
                                  "step slower than max(this, step_timeout_factor x mean "
                                  "step time) counts as a hung worker.")
    step_timeout_factor: float = Field(50.0, ge=1, description="Watchdog scale on the "
                                       "measured mean step time.")
    request_timeout_s: float | None = Field(600.0, gt=0, description="Default per-request "
                                            "deadline (None = none); a request may set a "
                                            "shorter `timeout_s`.")
    stalled_client_s: float | None = Field(5.0, gt=0, description="A streaming client that "
                                           "has not taken an available chunk for this long "
                                           "(stopped reading) is aborted and its slots freed "
                                           "(None = never).")
    recovery_timeout_s: float = Field(120.0, gt=0, description="Bound on recreating a "
                                      "worker (model load included); past it the replica "
                                      "reports unhealthy and its requests get a clean error.")
    actor_call_timeout_s: float = Field(30.0, gt=0, description="Bound on control calls to "
                                        "the workers (health, prefill on resync, stats).")
    draft_restart_backoff_s: float = Field(1.0, ge=0, description="Wait before recreating "
                                           "the draft worker (doubles on repeated failures, "
                                           "capped at 60 s).")
    drain_timeout_s: float = Field(30.0, ge=0, description="On replica shutdown, how long "
                                   "running requests may take to finish.")
    allow_fault_injection: bool = Field(False, description="TESTS ONLY: permit `inject` / "
                                        "SPECSERVE_FAULTS. Shipped configs leave it off.")
    inject: tuple[FaultSpecConfig, ...] = Field((), description="Faults to inject (tests "
                                                "only; needs allow_fault_injection).")

    @model_validator(mode="before")
    @classmethod
    def _from_env(cls, data):
        text = os.environ.get("SPECSERVE_FAULTS", "").strip()
        if text and isinstance(data, dict) and not data.get("inject"):
            data = {**data, "inject": parse_fault_env(text)}
        return data

    @model_validator(mode="after")
    def _injection_allowed(self):
        if self.inject and not self.allow_fault_injection:
            raise ValueError("fault injection (faults.inject or SPECSERVE_FAULTS) is refused "
                             "unless faults.allow_fault_injection is true (tests only)")
        return self
