"""Speculation statistics: pure, summable records (exporters live elsewhere).

Glossary as in the rejection sampler: per step a request drafts k tokens, the target
accepts n <= k of them and adds one final token, so it emits n + 1 tokens per target call.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


def count_values(counts: list[int], values) -> None:
    """Histogram in place: counts[v] += 1 for every v in `values` (the list grows)."""
    for v in values:
        if v >= len(counts):
            counts.extend([0] * (v + 1 - len(counts)))
        counts[v] += 1


@dataclass
class SpecStats:
    num_steps: int = 0              # target calls (verification steps) for this request
    num_drafts: int = 0             # steps that drafted at least one token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    # Totals only: the same counters per drafter ('model', 'ngram', 'none' for rows that
    # drafted nothing), so acceptance can be compared across drafters. Per-request stats
    # leave it empty.
    per_drafter: dict[str, "SpecStats"] = field(default_factory=dict)

    def observe_drafter(self, drafter: str, num_draft: int, num_accepted: int) -> None:
        stats = self.per_drafter.get(drafter)
        if stats is None:
            stats = self.per_drafter[drafter] = SpecStats()
        stats.observe(num_draft, num_accepted)

    def merged(self, other: "SpecStats") -> "SpecStats":
        """The sum of two records (e.g. two routers' totals)."""
        longest = max(len(self.accepted_per_position), len(other.accepted_per_position))
        per_pos = [(self.accepted_per_position[i] if i < len(self.accepted_per_position) else 0)
                   + (other.accepted_per_position[i] if i < len(other.accepted_per_position)
                      else 0) for i in range(longest)]
        names = sorted(set(self.per_drafter) | set(other.per_drafter))
        per_drafter = {n: self.per_drafter.get(n, SpecStats()).merged(
            other.per_drafter.get(n, SpecStats())) for n in names}
        return SpecStats(self.num_steps + other.num_steps, self.num_drafts + other.num_drafts,
                         self.num_draft_tokens + other.num_draft_tokens,
                         self.num_accepted_tokens + other.num_accepted_tokens, per_pos,
                         per_drafter)

    def observe(self, num_draft: int, num_accepted: int) -> None:
        self.num_steps += 1
        if num_draft > 0:
            self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_accepted:
            self.accepted_per_position.extend([0] * (num_accepted - len(self.accepted_per_position)))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    def merge_step(self, step: "StepStats") -> None:
        # Totals count request-steps: each row of a batched step is one verification.
        self.num_steps += step.batch_size
        self.num_draft_tokens += step.num_draft_tokens
        self.num_accepted_tokens += step.num_accepted_tokens

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 when nothing was drafted)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per target call, the final (recovered or bonus) token included."""
        return 1.0 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0

    def copy(self) -> "SpecStats":
        return replace(self, accepted_per_position=list(self.accepted_per_position),
                       per_drafter={n: s.copy() for n, s in self.per_drafter.items()})

    def summary(self) -> dict:
        out = {"num_draft_tokens": self.num_draft_tokens,
               "num_accepted_tokens": self.num_accepted_tokens,
               "num_steps": self.num_steps,
               "acceptance_rate": round(self.acceptance_rate, 4),
               "mean_acceptance_length": round(self.mean_acceptance_length, 4)}
        if self.per_drafter:
            out["per_drafter"] = {n: s.summary() for n, s in sorted(self.per_drafter.items())}
        return out


@dataclass(frozen=True)
class StepStats:
    """One engine step, for the cost model and the benchmarks."""

    batch_size: int
    num_draft_tokens: int
    num_accepted_tokens: int
    num_emitted_tokens: int
    draft_seconds: float
    verify_seconds: float
    total_seconds: float            # the whole step as the step loop saw it
    prefill_seconds: float = 0.0    # admissions handled in the same step

    @property
    def overhead_seconds(self) -> float:
        """Router, transport and bookkeeping: what the models' forwards do not explain."""
        return max(0.0, self.total_seconds - self.draft_seconds - self.verify_seconds
                   - self.prefill_seconds)


@dataclass
class StepTotals:
    """Running sums over steps (bounded memory for a long-lived server)."""

    steps: int = 0
    rows: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    total_seconds: float = 0.0
    overhead_seconds: float = 0.0

    # Router side (specserve_ray/step_timing.py), summed over the same steps.
    plan_seconds: float = 0.0
    apply_seconds: float = 0.0
    loop_wait_seconds: float = 0.0
    transport_seconds: float = 0.0
    hop_seconds: dict = field(default_factory=lambda: {
        "to_draft": 0.0, "draft_to_target": 0.0, "to_router": 0.0})
    worker_busy_seconds: float = 0.0

    def add_router(self, timing) -> None:
        """Add one decode step's router-side `StepTiming` (call beside `add`)."""
        self.plan_seconds += timing.plan
        self.apply_seconds += timing.apply
        self.loop_wait_seconds += timing.loop_wait
        if timing.transport is not None:
            self.transport_seconds += timing.transport
            self.worker_busy_seconds += timing.worker_busy
            for key in self.hop_seconds:
                value = getattr(timing, key)
                if value is not None:
                    self.hop_seconds[key] += value

    def add(self, step: StepStats) -> None:
        self.steps += 1
        self.rows += step.batch_size
        self.draft_seconds += step.draft_seconds
        self.verify_seconds += step.verify_seconds
        self.prefill_seconds += step.prefill_seconds
        self.total_seconds += step.total_seconds
        self.overhead_seconds += step.overhead_seconds

    def summary(self) -> dict:
        return {"steps": self.steps, "rows": self.rows,
                "draft": round(self.draft_seconds, 6), "verify": round(self.verify_seconds, 6),
                "prefill": round(self.prefill_seconds, 6), "total": round(self.total_seconds, 6),
                "overhead": round(self.overhead_seconds, 6),
                # Router side: planning, applying, asyncio waits, transport (Ray calls and
                # serialization) and its hops; `cycle` = what one step costs end to end.
                "plan": round(self.plan_seconds, 6), "apply": round(self.apply_seconds, 6),
                "loop_wait": round(self.loop_wait_seconds, 6),
                "transport": round(self.transport_seconds, 6),
                **{k: round(v, 6) for k, v in self.hop_seconds.items()},
                "worker_busy": round(self.worker_busy_seconds, 6),
                "cycle": round(self.total_seconds + self.plan_seconds + self.apply_seconds
                               + self.loop_wait_seconds, 6)}
