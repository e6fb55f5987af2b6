"""Named workloads: request lengths from an Azure trace, arrivals at a chosen rate (pure).

A workload is a request set: (arrival time, input tokens, output tokens) per request. Every
policy at one (workload, rate, repetition) gets the same set, so policies are compared on
identical work. Lengths are drawn i.i.d. from the trace's (context, generated) pairs and then
scaled and capped to what the served models accept (context 1024 for the embedded pair);
arrivals are Poisson or gamma at the rate, or the trace's own arrival pattern time-scaled to
it ("replay", which keeps the trace's lengths in order too).

| name         | trace | outputs             | inputs                                         |
|--------------|-------|---------------------|------------------------------------------------|
| code         | code  | trace's, 2-128      | scaled so the trace's p99 fills the context    |
| conv-decode  | conv  | trace's, 128-256    | scaled so the p99 fills what outputs leave     |
| code-replay  | code  | trace's, 2-128      | as code; arrivals: the trace's, time-scaled    |
| code-long    | code  | trace's, 16-64      | scaled so the median is 640 tokens (load bench)|
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from specserve_ray.bench import trace as tr

TRACE_FILES = {"code": "AzureLLMInferenceTrace_code.csv",
               "conv": "AzureLLMInferenceTrace_conv.csv"}


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    trace: str                       # key of TRACE_FILES
    min_output: int
    max_output: int
    input_median: int | None = None  # scale inputs so the median is this (else p99 fills)
    replay: bool = False             # the trace's own arrivals (time-scaled) and order


WORKLOADS = {
    "code": WorkloadSpec("code", "code", 2, 128),
    "conv-decode": WorkloadSpec("conv-decode", "conv", 128, 256),
    "code-replay": WorkloadSpec("code-replay", "code", 2, 128, replay=True),
    "code-long": WorkloadSpec("code-long", "code", 16, 64, input_median=640),
}
ARRIVALS = ("poisson", "gamma")


def parse_workload(text: str) -> tuple[WorkloadSpec, str]:
    """'code', 'code:gamma', 'conv-decode:poisson', 'code-replay' -> (spec, arrival)."""
    name, _, arrival = text.strip().lower().partition(":")
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    spec = WORKLOADS[name]
    if spec.replay:
        if arrival and arrival != "replay":
            raise ValueError(f"{name} replays the trace's own arrivals; no ':{arrival}'")
        return spec, "replay"
    arrival = arrival or "poisson"
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival {arrival!r} of {text!r}: one of {ARRIVALS}")
    return spec, arrival


def find_trace(name: str, explicit_dir: str | None = None, env: dict | None = None,
               cwd: str = ".") -> str:
    """Path of a trace CSV: in --trace-dir only when given; else $SPECSERVE_SHARED/traces,
    then ../shared/traces."""
    import os

    env = os.environ if env is None else env
    dirs = [explicit_dir] if explicit_dir else []
    if not explicit_dir and env.get("SPECSERVE_SHARED"):
        dirs.append(os.path.join(env["SPECSERVE_SHARED"], "traces"))
    if not explicit_dir:
        dirs.append(os.path.join(cwd, "..", "shared", "traces"))
    for d in dirs:
        path = os.path.join(d, TRACE_FILES[name])
        if os.path.isfile(path):
            return path
    raise tr.TraceError(f"{TRACE_FILES[name]} not found in {dirs}; pass --trace-dir DIR "
                        "(the Azure LLM inference traces 2023, Azure/AzurePublicDataset)")


def input_scale(spec: WorkloadSpec, rows: list[tr.TraceRequest], budget: int) -> float:
    """Multiplier of the trace's context lengths for this workload."""
    if spec.input_median is not None:
        med = float(np.median([r.input_tokens for r in rows]))
        return spec.input_median / med if med > 0 else 1.0
    return tr.auto_input_scale(rows, budget)


def fit(spec: WorkloadSpec, rows: list[tr.TraceRequest], all_rows: list[tr.TraceRequest],
        max_model_len: int, input_budget: int | None = None) -> list[tr.TraceRequest]:
    """Lengths of `rows` scaled (by the whole trace's statistics) and clipped for `spec`."""
    out_cap = min(spec.max_output, max_model_len // 2)
    budget = min(input_budget or max_model_len, max_model_len - out_cap)
    scale = input_scale(spec, all_rows, budget)
    fitted = tr.fit_lengths(rows, max_model_len, input_scale=scale, max_output_tokens=out_cap,
                            max_input_tokens=budget, min_output_tokens=min(spec.min_output,
                                                                           out_cap))
    return fitted


def request_count(rate: float, duration_s: float, min_requests: int, max_requests: int) -> int:
    """Enough requests for `duration_s` of arrivals at `rate`, at least `min_requests`."""
    return int(min(max_requests, max(min_requests, math.ceil(rate * duration_s))))


def make_requests(spec: WorkloadSpec, arrival: str, rows: list[tr.TraceRequest], rate: float,
                  count: int, seed: int, max_model_len: int, input_budget: int | None = None,
                  burstiness: float = 0.5) -> list[tr.TraceRequest]:
    """The request set of one (workload, rate, repetition): deterministic in `seed`."""
    if not rate > 0 or count < 1:
        raise ValueError("need rate > 0 and count >= 1")
    rng = np.random.default_rng([seed, 7])
    if spec.replay:
        span = rows[-1].arrival_s if rows else 0.0
        start = float(rng.uniform(0, max(span - 1.0, 0.0))) if span > 0 else 0.0
        picked = tr.scale_to_rate(tr.window(rows, start, count), rate)
        return fit(spec, picked, rows, max_model_len, input_budget)
    picked = [rows[i] for i in rng.integers(0, len(rows), count)]
    fitted = fit(spec, picked, rows, max_model_len, input_budget)
    shape = 1.0 if arrival == "poisson" else burstiness
    times = tr.gamma_arrivals(rate, count, shape, seed=int(rng.integers(1 << 31)))
    return tr.with_arrivals(fitted, times)


def length_summary(reqs: list[tr.TraceRequest]) -> dict:
    ins = [r.input_tokens for r in reqs]
    outs = [r.output_tokens for r in reqs]
    return {"requests": len(reqs), "input_median": float(np.median(ins)),
            "input_p99": float(np.percentile(ins, 99)), "output_median": float(np.median(outs)),
            "output_p99": float(np.percentile(outs, 99)),
            "span_s": reqs[-1].arrival_s if reqs else 0.0}

