"""Azure trace handling for `bench sweep`: workloads from an Azure LLM inference trace, or synthetic arrivals.

Pure functions (no Ray, no HTTP): load the trace CSV (columns TIMESTAMP, ContextTokens,
GeneratedTokens), take a window of it, time-scale its arrivals to a request rate, scale and
cap its token lengths to what the served models accept, or draw Poisson / gamma arrivals.
The sweep that replays them lives in `sweep.py`; this module also registers the CLI.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float      # seconds after the first request of the workload
    input_tokens: int
    output_tokens: int


class TraceError(ValueError):
    """A trace file that cannot be used (missing, wrong columns, bad values)."""


def _parse_timestamp(value: str) -> float:
    """Seconds (float) from either a number or 'YYYY-mm-dd HH:MM:SS.fffffff'."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    # The Azure 2023 traces carry 7 fractional digits; strptime's %f takes at most 6.
    head, _, frac = value.partition(".")
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_trace(path: str, limit: int | None = None) -> list[TraceRequest]:
    """Rows of an Azure LLM inference trace, arrivals relative to the first row, sorted."""
    if not path or not os.path.isfile(path):
        raise TraceError(f"trace file not found: {path!r}")
    rows: list[TraceRequest] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing column(s) {missing}; an Azure LLM inference "
                             f"trace has {list(TRACE_COLUMNS)}, found {reader.fieldnames}")
        t0 = None
        for line, rec in enumerate(reader, start=2):
            try:
                t = _parse_timestamp(rec["TIMESTAMP"])
                ctx, gen = int(rec["ContextTokens"]), int(rec["GeneratedTokens"])
            except (ValueError, TypeError) as exc:
                raise TraceError(f"{path}:{line}: bad row {rec!r} ({exc})") from None
            if ctx < 0 or gen < 0:
                raise TraceError(f"{path}:{line}: negative token count")
            t0 = t if t0 is None else t0
            rows.append(TraceRequest(t - t0, ctx, gen))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise TraceError(f"{path}: no rows")
    rows.sort(key=lambda r: r.arrival_s)
    first = rows[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - first) for r in rows]


def window(reqs: list[TraceRequest], start_s: float, count: int) -> list[TraceRequest]:
    """`count` consecutive requests from `start_s` on (wrapping around), re-based to 0."""
    if not reqs or count <= 0:
        return []
    first = next((i for i, r in enumerate(reqs) if r.arrival_s >= start_s), 0)
    out, span = [], reqs[-1].arrival_s
    for j in range(count):
        i = first + j
        # Wrap around with the trace's own span (plus its mean gap) so time keeps rising.
        laps, i = divmod(i, len(reqs))
        gap = span / max(1, len(reqs) - 1)
        out.append(replace(reqs[i], arrival_s=reqs[i].arrival_s + laps * (span + gap)))
    t0 = out[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - t0) for r in out]


def scale_time(reqs: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """Multiply every arrival time by `factor` (< 1 compresses: a higher rate)."""
    if not factor > 0:
        raise ValueError(f"time scale must be > 0, got {factor}")
    return [replace(r, arrival_s=r.arrival_s * factor) for r in reqs]


def mean_rate(reqs: list[TraceRequest]) -> float:
    """Requests per second over the workload: n arrivals in n-1 gaps."""
    if len(reqs) < 2 or reqs[-1].arrival_s <= 0:
        return math.inf
    return (len(reqs) - 1) / reqs[-1].arrival_s


def scale_to_rate(reqs: list[TraceRequest], rate: float) -> list[TraceRequest]:
    """Time-scale so the mean arrival rate is `rate` req/s; the burst shape is kept."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    current = mean_rate(reqs)
    if not math.isfinite(current):
        # All at one instant (or one request): spread evenly at the rate.
        return [replace(r, arrival_s=i / rate) for i, r in enumerate(reqs)]
    return scale_time(reqs, current / rate)


def fit_lengths(reqs: list[TraceRequest], max_model_len: int, input_scale: float = 1.0,
                output_scale: float = 1.0, max_input_tokens: int | None = None,
                max_output_tokens: int | None = None, min_input_tokens: int = 1,
                min_output_tokens: int = 2) -> list[TraceRequest]:
    """Scale then cap lengths so every request fits: input + output <= max_model_len.

    min_output_tokens defaults to 2 so every request has a TPOT (one inter-token gap).
    The output keeps its (capped) length; the input yields when both do not fit.
    """
    if max_model_len < min_input_tokens + min_output_tokens:
        raise ValueError("max_model_len is smaller than the minimum request")
    out = []
    for r in reqs:
        o = max(min_output_tokens, round(r.output_tokens * output_scale))
        if max_output_tokens is not None:
            o = min(o, max_output_tokens)
        o = min(o, max_model_len - min_input_tokens)
        i = max(min_input_tokens, round(r.input_tokens * input_scale))
        if max_input_tokens is not None:
            i = min(i, max_input_tokens)
        i = min(i, max_model_len - o)
        out.append(replace(r, input_tokens=i, output_tokens=o))
    return out


def auto_input_scale(reqs: list[TraceRequest], budget_tokens: int, quantile: float = 0.99) -> float:
    """A scale that maps the `quantile` context length onto `budget_tokens` (never > 1):
    the distribution's shape survives; only the longest 1% are capped."""
    q = float(np.quantile([r.input_tokens for r in reqs], quantile)) if reqs else 0.0
    return min(1.0, budget_tokens / q) if q > 0 else 1.0


def poisson_arrivals(rate: float, count: int, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process at `rate` req/s (first at 0)."""
    return gamma_arrivals(rate, count, burstiness=1.0, seed=seed)


def gamma_arrivals(rate: float, count: int, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Gamma-distributed gaps with mean 1/rate and shape `burstiness` (vLLM's knob):
    1 = Poisson; < 1 burstier (CV = 1/sqrt(burstiness)); > 1 more regular."""
    if not rate > 0 or not burstiness > 0:
        raise ValueError("rate and burstiness must be > 0")
    if count <= 0:
        return []
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def with_arrivals(reqs: list[TraceRequest], arrivals: list[float]) -> list[TraceRequest]:
    """The trace's lengths, in order, at the given arrival times."""
    return [replace(r, arrival_s=float(t)) for r, t in zip(reqs, arrivals)]


def add_parser(sub):
    from specserve_ray.bench.args import add_arguments

    def run(args):   # imported on use: `--help` stays fast
        from specserve_ray.bench.sweep import run as run_sweep

        return run_sweep(args)

    p = sub.add_parser("sweep", aliases=["trace"], help="policies x rates x workloads x "
                       "regimes with Azure-trace lengths: SLO attainment, goodput, max rate at "
                       "90%% attainment with CIs, paired differences, JSON, tables, plots")
    add_arguments(p)
    p.set_defaults(func=run)
