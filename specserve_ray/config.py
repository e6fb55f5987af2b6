"""The one typed configuration at the boundary: models, speculation, limits, SLOs, signals.

Everything a user sets (serve config, HTTP body, Python call) is validated here with a
clear message; the hot path then works on the plain values these models hold.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specserve_ray.contracts import Drafter
from specserve_ray.faults_config import FaultsConfig, FaultSpecConfig, parse_fault_env  # noqa: F401
from specserve_ray.front_config import FrontDoorConfig
from specserve_ray.policy.slo import NO_SLO, SloClass, SloRegistry

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_PAIR_DIR = ASSETS_DIR / "tiny-pair"
EMBEDDED_TARGET = str(EMBEDDED_PAIR_DIR / "target")
EMBEDDED_DRAFT = str(EMBEDDED_PAIR_DIR / "draft")

DType = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Where a causal LM comes from and how it is placed."""

    path: str = Field(description="Local directory in Hugging Face format (config.json, "
                      "safetensors, tokenizer). Never downloaded: the path must exist.")
    dtype: DType = Field("float32", description="Weights and activations dtype. Exact "
                         "greedy equality with target-only decoding holds in float32.")
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'.")
    device_map: str | None = Field(None, description="accelerate device map ('auto', "
                                   "'balanced'...) to spread a large model over GPUs; "
                                   "overrides `device`.")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU.")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str) -> str:
        p = Path(os.path.expanduser(value))
        if not (p / "config.json").is_file():
            raise ValueError(
                f"model path {value!r} is not a local Hugging Face model directory "
                "(no config.json there); SpecServe-Ray never downloads weights"
            )
        return str(p)

    @field_validator("device")
    @classmethod
    def _device_ok(cls, value: str) -> str:
        if not (value == "cpu" or value == "cuda" or value.startswith("cuda:")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value


class SpeculationConfig(_Strict):
    """How much to speculate. The adaptive policies build on `num_speculative_tokens`."""

    num_speculative_tokens: int = Field(4, ge=0, le=16, description="Static k: draft "
                                        "tokens proposed per request per step (0 = plain "
                                        "decoding). Also the most an adaptive policy may "
                                        "draft (its max_k).")
    policy: str = Field("static", description="Speculation policy: 'static' (= static:"
                        "<num_speculative_tokens>), 'static:K', 'none', 'threshold', "
                        "'threshold:T', 'smartspec' or 'specserve'. The adaptive ones choose "
                        "each request's k every step from a start-up cost profile.")
    profile_budget_s: float = Field(10.0, gt=0, le=600, description="Seconds the start-up "
                                    "profile of draft and target forwards may take (adaptive "
                                    "policies only; the fitted model is cached on disk).")
    drafter: Drafter = Field("model", description="Who proposes draft tokens: 'model' (the "
                             "draft model), 'ngram' (prompt lookup: the tokens that followed "
                             "the longest recent earlier occurrence of the sequence's suffix "
                             "in its own prompt and output; no draft model needed, zero draft "
                             "cost) or 'model+ngram' (the n-gram proposal where there is a "
                             "match, the model elsewhere). A request may choose its own with "
                             "`drafter`.")
    prompt_lookup_max: int = Field(4, ge=1, le=32, description="Longest suffix n-gram the "
                                   "n-gram drafter matches (tried first).")
    prompt_lookup_min: int = Field(1, ge=1, le=32, description="Shortest suffix n-gram "
                                   "that counts as a match (shorter: no n-gram proposal). "
                                   "1 measured best (scripts/study_ngram.py; README); "
                                   "weak matches are priced by their own observed "
                                   "acceptance per match length.")
    yield_to_prompts: bool = Field(False, description="specserve only, with SLO classes "
                                   "that set ttft_s: drafted tokens take only the part of "
                                   "the step budget waiting prompts do not need to meet "
                                   "their TTFT. Off by default: measured to help near and "
                                   "past capacity and to cost attainment at light load "
                                   "(README, 'Sharing the step budget under SLOs').")
    synthetic_acceptance_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="BENCHMARK ONLY, NOT LOSSLESS: the target accepts "
        "each draft token with this probability instead of verifying it (the forward still "
        "runs, so costs are real), to measure a system at a chosen acceptance rate. None "
        "(the default) = real lossless verification.")

    @model_validator(mode="after")
    def _lookup_sizes(self) -> "SpeculationConfig":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) exceeds "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        return self

    @property
    def uses_ngram(self) -> bool:
        return self.drafter != "model"

    @field_validator("policy")
    @classmethod
    def _policy_known(cls, value: str) -> str:
        from specserve_ray.policy.spec import parse_policy

        return str(parse_policy(value))   # normalized: "SpecServe " -> "specserve"

    @property
    def spec(self):
        """The policy string, parsed (a `PolicySpec`)."""
        from specserve_ray.policy.spec import parse_policy

        return parse_policy(self.policy)

    @property
    def static_k(self) -> int | None:
        """The fixed k of a static policy; None for the adaptive ones ('none' included)."""
        return self.spec.static_k(self.num_speculative_tokens)

    @property
    def needs_cost_model(self) -> bool:
        return self.spec.needs_cost_model


class LimitsConfig(_Strict):
    max_model_len: int = Field(1024, ge=8, le=1 << 20, description="Prompt plus output "
                               "tokens per request.")
    max_num_seqs: int = Field(16, ge=1, le=1024, description="Requests decoded together.")
    max_tokens: int = Field(1024, ge=1, description="Upper bound a request may ask for.")
    max_num_batched_tokens: int | None = Field(
        64, ge=1, description="Token budget of a step that decodes (vLLM's name): decode "
        "rows first (k + 1 tokens each), then prompt chunks of waiting requests fill what is "
        "left (at least a quarter of it), so an arriving long prompt is prefilled over "
        "several steps instead of stalling the running batch. 64 = measured on 2 CPU cores "
        "(README, 'Step budget and chunked prefill'). None = whole prompts at once. With "
        "SLO classes that set tpot_s, a step may grow past it into the decode rows' TPOT "
        "room while prompts wait (README, 'SLO classes').")
    max_prefill_tokens_idle: int | None = Field(
        256, ge=1, description="Token budget of a step with no request decoding (prompt "
        "chunks only): nobody waits on that step between two tokens, so it may prefill in "
        "larger, cheaper-per-token chunks. Used only when larger than "
        "max_num_batched_tokens; None = max_num_batched_tokens.")


class SloClassConfig(_Strict):
    """One latency class (SpecServe section 5.3); an omitted budget means none."""

    name: str = Field(min_length=1, description="What requests name in `slo_class`.")
    ttft_s: float | None = Field(None, gt=0, description="Time-to-first-token budget in "
                                 "seconds, from arrival. Orders admission (least slack "
                                 "first) and counts toward attainment.")
    tpot_s: float | None = Field(None, gt=0, description="Budget for the mean time per "
                                 "output token after the first, in seconds. The specserve "
                                 "policy keeps each step's predicted time within the "
                                 "tightest one in the batch.")
    ttft_per_prompt_token_s: float = Field(0.0, ge=0, allow_inf_nan=False, description=(
        "Seconds added to ttft_s per prompt token: a TTFT budget that grows with the "
        "prompt, as prefill time does (needs ttft_s)."))

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError(f"SLO class name {value!r} has surrounding whitespace")
        return value

    @model_validator(mode="after")
    def _budgets_consistent(self) -> "SloClassConfig":
        self.to_class()      # SloClass holds the rules (e.g. a per-token TTFT needs ttft_s)
        return self

    def to_class(self) -> SloClass:
        return SloClass(self.name, math.inf if self.ttft_s is None else self.ttft_s,
                        math.inf if self.tpot_s is None else self.tpot_s,
                        self.ttft_per_prompt_token_s)


class SloConfig(_Strict):
    """Named latency classes a request may ask for with `slo_class`.

    A class named `best-effort` with no budgets always exists (define one of that name to
    give it budgets), and is the default, so configs without SLOs behave as before.
    """

    classes: tuple[SloClassConfig, ...] = Field((), description="The classes, e.g. "
                                                "[{name: interactive, ttft_s: 1.0, tpot_s: "
                                                "0.1}, {name: batch}].")
    default_class: str = Field(NO_SLO.name, description="The class of a request that names "
                               "none.")

    @model_validator(mode="after")
    def _names_consistent(self) -> "SloConfig":
        names = [c.name for c in self.classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"SLO class names must be unique; repeated: {duplicates}")
        known = self.class_names
        if self.default_class not in known:
            raise ValueError(f"default_class {self.default_class!r} is not a defined SLO "
                             f"class; known: {known}")
        return self

    @property
    def class_names(self) -> list[str]:
        return sorted({c.name for c in self.classes} | {NO_SLO.name})

    def registry(self) -> SloRegistry:
        classes = [c.to_class() for c in self.classes]
        if all(c.name != NO_SLO.name for c in classes):
            classes.append(NO_SLO)
        return SloRegistry(classes, self.default_class)


class EngineConfig(_Strict):
    target: ModelConfig = Field(default_factory=lambda: ModelConfig(path=EMBEDDED_TARGET))
    draft: ModelConfig | None = Field(
        default_factory=lambda: ModelConfig(path=EMBEDDED_DRAFT),
        description="None disables speculation (target-only serving).",
    )
    speculation: SpeculationConfig = Field(default_factory=SpeculationConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    slo: SloConfig = Field(default_factory=SloConfig, description="Latency SLO classes; "
                           "by default only `best-effort` (no budgets).")

    @model_validator(mode="before")
    @classmethod
    def _embedded_by_default(cls, data):
        # A model section without `path` means the embedded pair's model of that role,
        # so configs can set dtype/threads for the embedded pair without spelling paths.
        if isinstance(data, dict):
            data = dict(data)
            for role, path in (("target", EMBEDDED_TARGET), ("draft", EMBEDDED_DRAFT)):
                section = data.get(role)
                if isinstance(section, dict) and "path" not in section:
                    data[role] = {**section, "path": path}
        return data

    @model_validator(mode="after")
    def _limits_consistent(self) -> "EngineConfig":
        if self.limits.max_tokens >= self.limits.max_model_len:
            object.__setattr__(self, "limits", self.limits.model_copy(
                update={"max_tokens": self.limits.max_model_len - 1}))
        return self


class SignalsConfig(_Strict):
    """Router metrics (Prometheus via Ray) and the cluster speculation controller."""

    report_interval_s: float = Field(1.0, gt=0, le=60, description="How often each router "
                                     "exports its metrics and reports to the controller.")
    export_metrics: bool = Field(True, description="Export the specserve_* metrics through "
                                 "Ray's metrics agent (README lists them).")
    controller: bool = Field(False, description="Cap speculation by cluster-wide bounds from "
                             "the SpecController actor (deployments/controller.py).")
    controller_timeout_s: float = Field(2.0, gt=0, description="A report slower than this "
                                        "counts as a failure; the router keeps its last bounds.")
    controller_retry_s: float = Field(5.0, gt=0, description="Wait after a failed report "
                                      "before trying (or recreating the controller) again.")
    rule: dict = Field(default_factory=dict, description="Overrides of the bounds rule "
                       "(specserve_ray.policy.cluster.ClusterBoundsConfig), e.g. "
                       "{high_utilization: 0.9, verify_knee_tokens: 256}.")

    @field_validator("rule")
    @classmethod
    def _rule_ok(cls, value: dict) -> dict:
        from specserve_ray.policy.cluster import ClusterBoundsConfig

        try:
            ClusterBoundsConfig(**value)
        except TypeError as exc:
            raise ValueError(f"unknown bounds rule field: {exc}") from None
        return value


class AppConfig(_Strict):
    """Arguments of `deployments.app:build_app` (the `args:` of a Serve config)."""

    engine: EngineConfig = Field(default_factory=EngineConfig)
    model_name: str = Field("specserve-tiny", description="The model id served at /v1/models.")
    transport: Literal["compiled_graph", "actor"] = Field(
        "actor", description="Router <-> worker hop: plain actor calls (~1.3 ms each, the "
        "draft's output passed by reference to the target) or a Ray compiled graph "
        "(draft -> target, ~0.2 ms, but its waiting actors poll; on a 2-core CPU that "
        "steals the target's cores).")
    pipeline: bool = Field(
        False, description="Draft/verify pipelining: split the running requests into two "
        "micro-batches so the draft worker drafts one while the target verifies the other "
        "(each request is in one step at a time, so output is unchanged). Pays when draft "
        "and target run on separate devices; changeable at runtime (user_config).")
    router_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.2},
        description="Placement-group bundle of the router replica itself.")
    draft_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.4},
        description="Bundle of the draft worker actor, e.g. {'CPU': 1, 'GPU': 1}.")
    target_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.8},
        description="Bundle of the target worker actor, e.g. {'CPU': 1, 'GPU': 1}.")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="How the router, draft and target bundles are placed.")
    signals: SignalsConfig = Field(default_factory=SignalsConfig, description="Metrics "
                                   "export and the cluster speculation controller.")
    max_queued_requests: int = Field(64, ge=0, description="Requests waiting for a batch "
                                     "slot before new ones get HTTP 429 (with Retry-After).")
    max_ongoing_requests: int = Field(128, ge=1, description="Serve's per-replica cap on "
                                      "concurrent requests (past it Serve queues/rejects); keep "
                                      ">= engine.limits.max_num_seqs + max_queued_requests so "
                                      "the project's queue bound refuses first.")
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Deadlines, "
                                   "worker recovery, drain, and (tests only) fault injection.")
    chat_template: str | None = Field(None, description="Jinja chat template used when the "
                                      "tokenizer has none; None = the documented default.")
    front: FrontDoorConfig = Field(default_factory=FrontDoorConfig, description="Request "
                                   "size limits, token queue bound, Retry-After bounds and "
                                   "API keys (specserve_ray/front_config.py).")
