"""The runtime knobs a live replica takes from Serve's `user_config` (via `reconfigure`).

Typed and strict: an unknown key, a wrong type or an out-of-range value is a clear error
and nothing is applied. Omitted keys keep their current value.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, \
    ValidationError, field_validator

from specserve_ray.config import SloConfig, SpeculationConfig
from specserve_ray.contracts import Drafter


class UserConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_speculative_tokens: StrictInt | None = Field(None, ge=0, le=16, description="Static "
                                                     "k (and the adaptive policies' max k).")
    policy: str | None = Field(None, description="Speculation policy, as "
                               "engine.speculation.policy; switching to an adaptive one "
                               "profiles the workers once.")
    profile_budget_s: StrictInt | StrictFloat | None = Field(None, gt=0, le=600,
                                                           description="Start-up profile "
                                                           "budget for adaptive policies.")
    drafter: Drafter | None = Field(None, description="'model', 'ngram' or 'model+ngram' "
                                    "(as engine.speculation.drafter).")
    prompt_lookup_min: StrictInt | None = Field(None, ge=1, le=32, description="Shortest "
                                                "n-gram the n-gram drafter matches.")
    prompt_lookup_max: StrictInt | None = Field(None, ge=1, le=32, description="Longest "
                                                "n-gram the n-gram drafter matches.")
    yield_to_prompts: StrictBool | None = Field(None, description="As engine.speculation."
                                                "yield_to_prompts: specserve's drafts take "
                                                "only the step budget waiting prompts do "
                                                "not need.")
    max_num_seqs: StrictInt | None = Field(None, ge=1, description="Requests decoded "
                                           "together; at most engine.limits.max_num_seqs "
                                           "(the cache slots).")
    max_queued_requests: StrictInt | None = Field(None, ge=0, description="Requests waiting "
                                                  "for a slot before new ones get 429.")
    max_queued_tokens: StrictInt | None = Field(None, ge=1, description="Prompt + max_tokens "
                                                "of waiting requests before new ones get "
                                                "429.")
    pipeline: bool | None = Field(None, description="Draft/verify pipelining on or off.")
    slo: SloConfig | None = Field(None, description="The SLO classes (same shape as "
                                  "engine.slo); replaces them between steps.")

    @field_validator("policy")
    @classmethod
    def _policy_known(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            return SpeculationConfig(policy=value).policy
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ")
                                       for e in exc.errors())) from None

    @field_validator("pipeline", mode="before")
    @classmethod
    def _pipeline_bool(cls, value):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"pipeline must be true or false, got {value!r}")
        return value

    @classmethod
    def parse(cls, user_config: dict | None) -> "UserConfig":
        """Validate Serve's user_config; ValueError with every problem named."""
        if user_config is not None and not isinstance(user_config, dict):
            raise ValueError(f"user_config must be a mapping, got {type(user_config).__name__}")
        try:
            return cls.model_validate(user_config or {})
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                loc = ".".join(str(x) for x in err.get("loc", ()))
                msg = err.get("msg", "invalid").removeprefix("Value error, ")
                if err.get("type") == "extra_forbidden":
                    msg = "unknown user_config key"
                problems.append(f"{loc}: {msg}" if loc else msg)
            raise ValueError("invalid user_config: " + "; ".join(problems)) from None

    def check_against(self, slot_cap: int) -> None:
        """Rules that need the deployed app config (the KV cache slots)."""
        if self.max_num_seqs is not None and self.max_num_seqs > slot_cap:
            raise ValueError(f"invalid user_config: max_num_seqs must be in [1, {slot_cap}] "
                             "(the cache slots)")
