"""Serving metrics as pure, summable records; exporters (Prometheus via Ray) live elsewhere.

The router's step loop calls `MetricsAggregator.observe_step` once per step and
`observe_finished` once per finished request: plain integer and float additions, no Ray
calls, no I/O, so the hot path stays cheap. A background task calls `drain()` every
report interval; the `MetricsDelta` it returns feeds both the Prometheus exporter
(`deployments/metrics.py`) and the router's report to the cluster controller.

Glossary as vLLM's (`spec_decode_*`): a *draft* is one request drafting >= 1 token in
one step; per-position acceptance counts, for position j (0-based), the drafts whose
j-th token was accepted. Derived, in PromQL (Ray prefixes `ray_`, counters end `_total`):

    acceptance rate         = rate(ray_specserve_spec_decode_num_accepted_tokens_total[1m])
                            / rate(ray_specserve_spec_decode_num_draft_tokens_total[1m])
    mean acceptance length  = 1 + rate(ray_specserve_spec_decode_num_accepted_tokens_total[1m])
                                / rate(ray_specserve_spec_decode_num_drafts_total[1m])
    acceptance at pos j     = rate(ray_specserve_spec_decode_num_accepted_tokens_per_pos_total{position="j"}[1m])
                            / rate(ray_specserve_spec_decode_num_drafts_total[1m])
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from specserve_ray.policy.slo import ClassAttainment, request_latency  # noqa: F401 - re-exported

DEFAULT_SLO_CLASS = "default"
_MAX_BUFFERED = 4096        # histogram observations kept between drains (newest win)


@dataclass
class Counts:
    """Summable counters: totals since start, or one drain's increments."""

    steps: int = 0                   # executed plans
    decode_steps: int = 0            # plans that verified >= 1 running request
    decode_rows: int = 0             # requests verified, summed over decode steps
    admitted: int = 0                # requests prefilled (joined the batch)
    num_drafts: int = 0              # rows that drafted >= 1 token (vLLM num_drafts)
    num_draft_tokens: int = 0        # tokens drafted
    num_accepted_tokens: int = 0     # drafted tokens the target accepted
    num_emitted_tokens: int = 0      # tokens committed by decode steps (accepted + final)
    chosen_k_sum: int = 0            # k the plan asked for, summed over decode rows
    decode_seconds: float = 0.0      # wall time of decode steps
    predicted_seconds: float = 0.0   # cost-model prediction, over `predicted_steps` only
    predicted_observed_seconds: float = 0.0   # measured time of those same steps
    predicted_steps: int = 0
    expected_tokens: float = 0.0     # N = B + sum c_ij predicted for those steps
    expected_emitted: int = 0        # tokens those steps actually emitted
    accepted_per_pos: list[int] = field(default_factory=list)
    chosen_k_rows: dict[int, int] = field(default_factory=dict)   # k -> decode rows
    finished: int = 0
    # class -> its finished requests' attainment (classes with an SLO budget only): the
    # same records the scheduler's SloTracker sums (policy/slo.py).
    slo: dict[str, ClassAttainment] = field(default_factory=dict)
    faults: dict[str, float] = field(default_factory=dict)       # FAULT_EVENTS name -> count

    def add(self, other: "Counts") -> None:
        for name in ("steps", "decode_steps", "decode_rows", "admitted", "num_drafts",
                     "num_draft_tokens", "num_accepted_tokens", "num_emitted_tokens",
                     "chosen_k_sum", "decode_seconds", "predicted_seconds",
                     "predicted_observed_seconds", "predicted_steps", "expected_tokens",
                     "expected_emitted", "finished"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        _add_list(self.accepted_per_pos, other.accepted_per_pos)
        for k, n in other.chosen_k_rows.items():
            self.chosen_k_rows[k] = self.chosen_k_rows.get(k, 0) + n
        for name, record in other.slo.items():
            self.slo[name] = self.slo.get(name, ClassAttainment()) + record
        for name, n in other.faults.items():
            self.faults[name] = self.faults.get(name, 0) + n

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / drafts, vLLM's definition (tokens per draft, bonus included)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def first_position_acceptance(self) -> float:
        """Accepted-at-position-0 / drafts: an unbiased per-token acceptance estimate under
        the uniform model, whatever k was (accepted/drafted falls with k)."""
        if not self.num_drafts or not self.accepted_per_pos:
            return 0.0
        return self.accepted_per_pos[0] / self.num_drafts

    def summary(self) -> dict:
        return {"steps": self.steps, "decode_steps": self.decode_steps,
                "decode_rows": self.decode_rows, "num_drafts": self.num_drafts,
                "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "num_accepted_tokens_per_pos": list(self.accepted_per_pos),
                "num_emitted_tokens": self.num_emitted_tokens,
                "chosen_k_rows": {str(k): n for k, n in sorted(self.chosen_k_rows.items())},
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_acceptance_length": round(self.mean_acceptance_length, 4),
                "decode_seconds": round(self.decode_seconds, 6),
                "predicted_steps": self.predicted_steps,
                "predicted_seconds": round(self.predicted_seconds, 6),
                "predicted_observed_seconds": round(self.predicted_observed_seconds, 6),
                "finished": self.finished,
                "slo": {name: {"requests": c.requests, "attained": c.attained}
                        for name, c in sorted(self.slo.items())},
                "faults": dict(sorted(self.faults.items()))}


# Fault and recovery events, counted by the router's step loop (AsyncSpecEngine.faults).
FAULT_EVENTS = (
    "draft_failures",          # draft steps that raised, died or missed the deadline
    "draft_fallback_steps",    # such steps finished by the target alone (run again on it,
                               # or their requests re-admitted when it may have run them)
    "draft_restarts",          # draft workers recreated and resynced (speculation resumed)
    "draft_recovery_seconds",  # draft failure -> speculation resumed, summed
    "target_failures",         # target steps that died or missed the deadline
    "target_restarts",         # target workers recreated
    "target_recovery_seconds", # target failure -> serving again, summed
    "step_errors",             # steps that raised (requests retried in isolation)
    "isolation_retries",       # requests retried alone after such a step
    "resumed_requests",        # requests re-admitted with their committed tokens
    "failed_requests",         # requests ended by a fault (clean error)
    "request_timeouts",        # requests past their deadline
    "loop_restarts",           # step-loop crashes restarted by the supervisor
    "stalled_clients",         # streams aborted: the client stopped taking output
    "refused_queued_requests", # refusals by reason: the front door's request bound,
    "refused_queued_tokens",   # its token bound,
    "refused_queue_full",      # the step loop's own request bound (a handle call past it),
    "refused_draining",        # shutting down,
    "refused_unavailable",     # the target could not be recovered
)
RECOVERY_EVENTS = {"draft_recovery_seconds": "draft", "target_recovery_seconds": "target"}


class FaultCounts:
    """Totals of FAULT_EVENTS since start (pure), with a hook for the exporter."""

    def __init__(self, on_event=None):
        self.counts = {name: 0 for name in FAULT_EVENTS}
        self.on_event = on_event          # (event, amount) -> None; e.g. the aggregator

    def add(self, event: str, amount: float = 1) -> None:
        self.counts[event] = self.counts.get(event, 0) + amount
        if self.on_event is not None:
            self.on_event(event, amount)

    def summary(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.counts.items()}


def _add_list(into: list[int], other: Sequence[int]) -> None:
    if len(into) < len(other):
        into.extend([0] * (len(other) - len(into)))
    for i, n in enumerate(other):
        into[i] += n


@dataclass
class MetricsDelta:
    """What happened since the previous drain, plus the load right now."""

    counts: Counts
    step_seconds: list[float]        # decode steps, for the step-time histogram
    ttft: list[tuple[str, float]]    # (slo class, seconds) per finished request
    tpot: list[tuple[str, float]]    # (slo class, mean seconds per output token)
    window_s: float                  # seconds this delta covers
    queue_depth: int = 0
    running: int = 0
    verify_budget: int | None = None
    max_k: int | None = None
    recovery: list[tuple[str, float]] = field(default_factory=list)   # (worker, seconds)


class MetricsAggregator:
    """Accumulates per-step and per-request observations; `drain` hands out increments."""

    def __init__(self, now: float = 0.0):
        self.totals = Counts()
        self._delta = Counts()
        self._step_seconds: deque[float] = deque(maxlen=_MAX_BUFFERED)
        self._ttft: deque[tuple[str, float]] = deque(maxlen=_MAX_BUFFERED)
        self._tpot: deque[tuple[str, float]] = deque(maxlen=_MAX_BUFFERED)
        self._recovery: deque[tuple[str, float]] = deque(maxlen=_MAX_BUFFERED)
        self._last_drain = now

    def observe_step(self, seconds: float, admitted: int, chosen_k: Sequence[int],
                     num_drafted: Sequence[int], num_accepted: Sequence[int],
                     num_emitted: int, predicted_seconds: float | None = None,
                     expected_tokens: float | None = None) -> None:
        """One step: rows are aligned (chosen k, tokens drafted, tokens accepted)."""
        d = self._delta
        d.steps += 1
        d.admitted += admitted
        if not chosen_k:
            return
        d.decode_steps += 1
        d.decode_rows += len(chosen_k)
        d.decode_seconds += seconds
        d.num_emitted_tokens += num_emitted
        self._step_seconds.append(seconds)
        rows_k = d.chosen_k_rows
        for k in chosen_k:
            rows_k[k] = rows_k.get(k, 0) + 1
        d.chosen_k_sum += sum(chosen_k)
        per_pos = d.accepted_per_pos
        for drafted, accepted in zip(num_drafted, num_accepted):
            if drafted > 0:
                d.num_drafts += 1
                d.num_draft_tokens += drafted
            if accepted > 0:
                d.num_accepted_tokens += accepted
                if len(per_pos) < accepted:
                    per_pos.extend([0] * (accepted - len(per_pos)))
                for j in range(accepted):      # accepted <= k: a handful per row
                    per_pos[j] += 1
        if predicted_seconds is not None:
            d.predicted_steps += 1
            d.predicted_seconds += predicted_seconds
            d.predicted_observed_seconds += seconds
            if expected_tokens is not None:
                d.expected_tokens += expected_tokens
                d.expected_emitted += num_emitted

    def observe_finished(self, slo_class: str, ttft_s: float | None, tpot_s: float | None,
                         record: ClassAttainment | None) -> None:
        """One finished request; `record` (slo.attainment_record) None = its class sets
        no SLO budget, so there is nothing to attain (not counted)."""
        d = self._delta
        d.finished += 1
        if ttft_s is not None:
            self._ttft.append((slo_class, ttft_s))
        if tpot_s is not None:
            self._tpot.append((slo_class, tpot_s))
        if record is not None:
            d.slo[slo_class] = d.slo.get(slo_class, ClassAttainment()) + record

    def observe_fault(self, event: str, amount: float = 1) -> None:
        """One fault/recovery event (FAULT_EVENTS), or seconds for the *_seconds ones."""
        d = self._delta.faults
        d[event] = d.get(event, 0) + amount
        if event in RECOVERY_EVENTS:       # one recovery: its time, for the histogram
            self._recovery.append((RECOVERY_EVENTS[event], amount))

    def current(self) -> Counts:
        """Totals including what the next drain will hand out (a copy; drains unaffected)."""
        out = Counts()
        out.add(self.totals)
        out.add(self._delta)
        return out

    def drain(self, now: float, queue_depth: int = 0, running: int = 0) -> MetricsDelta:
        """Increments since the last drain (folded into `totals`), then start afresh."""
        delta, self._delta = self._delta, Counts()
        self.totals.add(delta)
        out = MetricsDelta(delta, list(self._step_seconds), list(self._ttft), list(self._tpot),
                           max(now - self._last_drain, 0.0), queue_depth, running,
                           recovery=list(self._recovery))
        self._recovery.clear()
        self._step_seconds.clear()
        self._ttft.clear()
        self._tpot.clear()
        self._last_drain = now
        return out
