"""How long a `bench sweep` plan takes, before it runs (printed up front, and `--dry-run`).

Per point: the arrivals' span (at least `--duration` s and `--min-requests` requests), the
backlog a rate past capacity leaves to drain, and a fixed per-run overhead; per regime the
app start and the policy profile; per cell the calibration.
"""
from __future__ import annotations

from specserve_ray.bench import workloads as wl
from specserve_ray.bench.policy_labels import parse_label

# Fixed costs for the duration estimate (this 2-core CPU; measured on smoke runs).
APP_START_S, CALIBRATION_S, PROFILE_S, PER_RUN_OVERHEAD_S = 40.0, 60.0, 30.0, 10.0


def cell_workloads(args, regime: str) -> list:
    """bf16 runs the first workload only unless --bf16-all-workloads (the goal matrix)."""
    specs = args.workload_specs
    return specs if regime != "bf16" or args.bf16_all_workloads else specs[:1]


def point_span_s(rate: float, args) -> float:
    return wl.request_count(rate, args.duration, args.min_requests, args.max_requests) / rate


def cell_estimate(args, regime: str, spec, cap: float) -> float:
    """Seconds of one (regime, workload) cell's runs at capacity `cap` req/s."""
    spans = []
    for i, (_, frac, rate) in enumerate(args.load_levels):
        if i not in args.run_levels:
            continue
        rate = rate or frac * cap
        span = point_span_s(rate, args)
        drain = max(0.0, rate / cap - 1.0) * span      # backlog past capacity
        spans.append(span + drain + PER_RUN_OVERHEAD_S)
    n_pol = len(args.policies)
    total = n_pol * args.repetitions * sum(spans)
    extra = max(0, args.deciding_repetitions - args.repetitions)
    k = min(args.deciding_rates, len(spans))
    if k:   # the deciding rates are unknown before the first pass: take the middle ones
        mid = sorted(spans)[(len(spans) - k) // 2:(len(spans) - k) // 2 + k]
        total += n_pol * extra * sum(mid)
    return total


def estimate_seconds(args, capacity: dict | None = None) -> float:
    """Wall time of the plan: arrivals + drain + per-run overhead, app starts, calibration."""
    total = 0.0
    adaptive = any(parse_label(p)[0] in ("smartspec", "specserve") for p in args.policies)
    for regime in args.regimes:
        total += (0.0 if args.url else APP_START_S) + (PROFILE_S if adaptive else 0.0)
        for spec, _ in cell_workloads(args, regime):
            cap = (capacity or {}).get((regime, spec.name)) or _assumed(args, spec.name)
            total += CALIBRATION_S
            if not args.calibrate_only:
                total += cell_estimate(args, regime, spec, cap)
    return total


def _assumed(args, workload: str) -> float:
    caps = args.assumed_capacity
    return caps.get(workload, caps.get("*", 1.0)) if isinstance(caps, dict) else float(caps)
