"""Latency SLO classes (SpecServe, arXiv 2503.05096, section 5.3) and their attainment.

A request belongs to one class; the class sets its time-to-first-token (TTFT) and
time-per-output-token (TPOT) budgets. A TTFT budget may grow with the prompt
(`ttft_per_prompt_token_s`): prefill time grows with the prompt, so one budget for all
would call a long prompt late before it could be served even alone. Speculation
lengthens a step, so the policy keeps the predicted step time within the tightest TPOT
budget in the batch; admission serves the waiting request with the least TTFT slack
first. A request *attains* its SLO when its TTFT and its mean TPOT are both within
budget. One finished request becomes one `ClassAttainment` record
(`attainment_record`); records are plain counts and sums that add up, and both the
scheduler's `SloTracker` and the metrics' `Counts` (metrics.py) are sums of those same
records, so the two cannot disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

__all__ = ["SloClass", "SloRegistry", "tightest_tpot", "admission_order", "ClassAttainment",
           "SloTracker", "NO_SLO", "request_latency", "attainment_record"]


@dataclass(frozen=True)
class SloClass:
    name: str
    ttft_s: float = math.inf      # budget for the first token, from arrival
    tpot_s: float = math.inf      # budget for the mean time between later tokens
    ttft_per_prompt_token_s: float = 0.0   # added to ttft_s per prompt token

    def __post_init__(self):
        if not self.name:
            raise ValueError("an SLO class needs a name")
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO budgets must be positive, got {self}")
        if not (self.ttft_per_prompt_token_s >= 0
                and math.isfinite(self.ttft_per_prompt_token_s)):
            raise ValueError(f"ttft_per_prompt_token_s must be >= 0, got {self}")
        if self.ttft_per_prompt_token_s > 0 and not math.isfinite(self.ttft_s):
            raise ValueError(f"SLO class {self.name!r}: ttft_per_prompt_token_s needs a "
                             f"ttft_s to add to")

    def ttft_budget(self, prompt_tokens: int = 0) -> float:
        """The TTFT budget of a request with this many prompt tokens (inf = none)."""
        return self.ttft_s + self.ttft_per_prompt_token_s * max(prompt_tokens, 0)


NO_SLO = SloClass("best-effort")


class SloRegistry:
    """Named classes plus the default one a request without a class gets."""

    def __init__(self, classes: Iterable[SloClass], default: str | None = None):
        self.classes = {c.name: c for c in classes}
        if not self.classes:
            self.classes = {NO_SLO.name: NO_SLO}
        self.default = default if default is not None else next(iter(self.classes))
        if self.default not in self.classes:
            raise ValueError(f"default SLO class {self.default!r} is not defined")

    @classmethod
    def from_config(cls, entries: Sequence[Mapping], default: str | None = None) -> "SloRegistry":
        """[{"name": "chat", "ttft_s": 1.0, "tpot_s": 0.05}, ...]; omitted budgets = none."""
        classes = []
        for entry in entries:
            unknown = set(entry) - {"name", "ttft_s", "tpot_s", "ttft_per_prompt_token_s"}
            if unknown:
                raise ValueError(f"unknown SLO class fields {sorted(unknown)}")
            classes.append(SloClass(entry["name"], float(entry.get("ttft_s", math.inf)),
                                    float(entry.get("tpot_s", math.inf)),
                                    float(entry.get("ttft_per_prompt_token_s", 0.0))))
        if len({c.name for c in classes}) != len(classes):
            raise ValueError("SLO class names must be unique")
        return cls(classes, default)

    def get(self, name: str | None = None) -> SloClass:
        if name is None:
            return self.classes[self.default]
        try:
            return self.classes[name]
        except KeyError:
            raise ValueError(f"unknown SLO class {name!r}; known: {sorted(self.classes)}") from None


def tightest_tpot(classes: Iterable[SloClass]) -> float:
    """The smallest TPOT budget among the batch's classes (inf for none)."""
    return min((c.tpot_s for c in classes), default=math.inf)


def admission_order(waiting: Sequence[tuple[float, float]], now: float) -> list[int]:
    """Indices of (arrival_time, TTFT budget s) pairs, least TTFT slack first, then
    earliest arrival. Slack = arrival + budget - now; requests without a TTFT budget
    (inf) go last, in arrival order."""
    return sorted(range(len(waiting)),
                  key=lambda i: (waiting[i][0] + waiting[i][1] - now, waiting[i][0], i))


@dataclass
class ClassAttainment:
    """Counts and latency sums/maxima for one class; addable (means are derived)."""

    requests: int = 0
    attained: int = 0
    ttft_met: int = 0
    tpot_met: int = 0
    ttft_sum_s: float = 0.0
    ttft_max_s: float = 0.0
    tpot_count: int = 0           # requests with a TPOT (more than one output token)
    tpot_sum_s: float = 0.0
    tpot_max_s: float = 0.0

    def __add__(self, other: "ClassAttainment") -> "ClassAttainment":
        return ClassAttainment(
            requests=self.requests + other.requests, attained=self.attained + other.attained,
            ttft_met=self.ttft_met + other.ttft_met, tpot_met=self.tpot_met + other.tpot_met,
            ttft_sum_s=self.ttft_sum_s + other.ttft_sum_s,
            ttft_max_s=max(self.ttft_max_s, other.ttft_max_s),
            tpot_count=self.tpot_count + other.tpot_count,
            tpot_sum_s=self.tpot_sum_s + other.tpot_sum_s,
            tpot_max_s=max(self.tpot_max_s, other.tpot_max_s))

    @property
    def rate(self) -> float:
        return self.attained / self.requests if self.requests else 1.0

    def summary(self) -> dict:
        """JSON-safe: latencies are None until a request measured them."""
        def mean(total, n):
            return round(total / n, 6) if n else None

        return {"requests": self.requests, "attained": self.attained,
                "ttft_met": self.ttft_met, "tpot_met": self.tpot_met,
                "attainment": round(self.rate, 4),
                "mean_ttft_s": mean(self.ttft_sum_s, self.requests),
                "max_ttft_s": round(self.ttft_max_s, 6) if self.requests else None,
                "mean_tpot_s": mean(self.tpot_sum_s, self.tpot_count),
                "max_tpot_s": round(self.tpot_max_s, 6) if self.tpot_count else None}


def request_latency(arrival: float, first_token: float | None, finish: float,
                    num_output_tokens: int) -> tuple[float | None, float | None]:
    """(TTFT, mean TPOT) of a finished request from monotonic timestamps. TPOT is the
    mean time between later tokens; None for a one-token output (nothing to measure)."""
    if first_token is None:
        return None, None
    ttft = max(first_token - arrival, 0.0)
    if num_output_tokens <= 1:
        return ttft, None
    return ttft, max(finish - first_token, 0.0) / (num_output_tokens - 1)


def attainment_record(slo: SloClass, ttft_s: float | None, mean_tpot_s: float | None,
                      prompt_tokens: int = 0) -> ClassAttainment:
    """One finished request as a record. `mean_tpot_s` is None for a one-token output,
    which has no inter-token time to miss; `ttft_s` None (no token) misses nothing."""
    ttft_ok = ttft_s is None or ttft_s <= slo.ttft_budget(prompt_tokens)
    tpot_ok = mean_tpot_s is None or mean_tpot_s <= slo.tpot_s
    ttft = 0.0 if ttft_s is None else ttft_s
    tpot = 0.0 if mean_tpot_s is None else mean_tpot_s
    return ClassAttainment(requests=1, attained=int(ttft_ok and tpot_ok), ttft_met=int(ttft_ok),
                           tpot_met=int(tpot_ok), ttft_sum_s=ttft, ttft_max_s=ttft,
                           tpot_count=int(mean_tpot_s is not None), tpot_sum_s=tpot,
                           tpot_max_s=tpot)


@dataclass
class SloTracker:
    """Per-class attainment of finished requests."""

    per_class: dict[str, ClassAttainment] = field(default_factory=dict)

    def record(self, slo: SloClass, ttft_s: float, mean_tpot_s: float | None,
               prompt_tokens: int = 0) -> bool:
        """Count one finished request; True if it attained (see `attainment_record`)."""
        record = attainment_record(slo, ttft_s, mean_tpot_s, prompt_tokens)
        self.per_class[slo.name] = self.per_class.get(slo.name, ClassAttainment()) + record
        return bool(record.attained)

    def __add__(self, other: "SloTracker") -> "SloTracker":
        merged = {name: ClassAttainment() + counts for name, counts in self.per_class.items()}
        for name, counts in other.per_class.items():
            merged[name] = merged.get(name, ClassAttainment()) + counts
        return SloTracker(merged)

    def attainment(self, name: str | None = None) -> float:
        """Attained fraction for one class, or over all classes (1.0 when empty)."""
        if name is not None:
            return self.per_class.get(name, ClassAttainment()).rate
        return sum(self.per_class.values(), ClassAttainment()).rate

    def summary(self) -> dict:
        return {name: c.summary() for name, c in sorted(self.per_class.items())}

    def report(self, registry: "SloRegistry") -> dict:
        """Per configured class: its budgets (None = none) and its finished requests'
        attainment and latencies. JSON-safe (no infinities)."""
        out = {}
        for name, cls in sorted(registry.classes.items()):
            out[name] = {"ttft_budget_s": cls.ttft_s if math.isfinite(cls.ttft_s) else None,
                         "ttft_per_prompt_token_s": cls.ttft_per_prompt_token_s,
                         "tpot_budget_s": cls.tpot_s if math.isfinite(cls.tpot_s) else None,
                         **self.per_class.get(name, ClassAttainment()).summary()}
        return {"default_class": registry.default, "classes": out}
