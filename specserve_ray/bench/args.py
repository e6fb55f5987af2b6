"""Command-line options of `bench sweep` (alias `trace`) and their checks (clear errors,
before any work)."""
from __future__ import annotations

import os

DEFAULT_POLICIES = ["none", "static:1", "static:3", "static:5", "threshold", "smartspec",
                    "specserve"]
DEFAULT_WORKLOADS = ["code:poisson", "conv-decode:poisson"]
DEFAULT_LOADS = "0.4,0.7,1.0,1.3"
ASSUMED_CAPACITY = "code=3.8,code-replay=3.8,code-long=2.6,conv-decode=1.1"
# --quick: one regime, one workload, three policies, two loads, 20 s per point (~5 min).
QUICK = {"regime": "fp32", "workloads": ["code:poisson"], "policies": ["none", "static:1",
         "specserve"], "loads": "0.25,0.75", "duration": 20.0, "min_requests": 12,
         "deciding_repetitions": 1, "warmup_requests": 2}


def add_arguments(p) -> None:
    g = p.add_argument_group("workloads")
    g.add_argument("--workloads", nargs="+", default=None, help="NAME[:ARRIVAL] with NAME in "
                   "code, conv-decode (outputs 128-256), code-replay (the raw trace's arrivals, "
                   "time-scaled), code-long; ARRIVAL poisson or gamma (default: "
                   f"{' '.join(DEFAULT_WORKLOADS)})")
    g.add_argument("--trace-dir", help="folder with the Azure traces (default: "
                   "$SPECSERVE_SHARED/traces, then ../shared/traces)")
    g.add_argument("--trace", help=argparse_suppress(), default=None)
    g.add_argument("--burstiness", type=float, default=0.5, help="gamma shape (1 = Poisson, "
                   "< 1 burstier: CV = 1/sqrt(burstiness))")
    g.add_argument("--loads", default=None, help="rates as fractions of each workload's "
                   f"measured closed-loop capacity (default {DEFAULT_LOADS})")
    g.add_argument("--rates", help="absolute request rates instead, e.g. 0.5,1,2 (req/s)")
    g.add_argument("--only-loads", help="run only these values of --loads (or --rates); each "
                   "rate's request set still comes from its place in the full list, so some "
                   "points of an earlier sweep run again on the same requests")
    g.add_argument("--duration", type=float, default=60.0,
                   help="seconds of arrivals per point at least (with --min-requests)")
    g.add_argument("--min-requests", type=int, default=60)
    g.add_argument("--max-requests", type=int, default=400)
    g.add_argument("--input-budget", type=int, help="cap on prompt tokens (default: the "
                   "context minus the workload's output cap; 1024 - 128 for the embedded pair)")
    g.add_argument("--max-model-len", type=int,
                   help="override the endpoint's max_model_len (from /v1/models)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("system under test")
    g.add_argument("--url", help="a running OpenAI-compatible endpoint (default: start the "
                   "default app once per regime)")
    g.add_argument("--dashboard-url", help="with --url: Ray dashboard to switch policies "
                   "through the Serve REST API (e.g. http://127.0.0.1:8265)")
    g.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    g.add_argument("--tokenizer", help="local tokenizer directory for prompt cutting "
                   "(default: the embedded pair's)")
    g.add_argument("--regime", choices=["bf16", "fp32", "both"], default=None,
                   help="target dtype of the started app (default both; bf16 only where the "
                   "CPU has native bf16, and on the first workload only); with --url a label")
    g.add_argument("--bf16-all-workloads", action="store_true",
                   help="run every workload in bf16 too (default: the first one)")
    g.add_argument("--force-bf16", action="store_true",
                   help="run bf16 even where the CPU lacks native bf16")
    g.add_argument("--drafter", default="model", choices=["model", "ngram", "model+ngram"],
                   help="the draft proposer every speculating policy uses (the started "
                   "app's speculation.drafter; with --url it is switched through "
                   "--dashboard-url, else only a label)")
    g.add_argument("--policies", nargs="+", default=None, help="policies, each as in "
                   "engine.speculation.policy, optionally with live knobs: POLICY@KEY=VALUE"
                   "[,KEY=VALUE] (e.g. specserve@yield_to_prompts=true), run as a policy of "
                   "its own: an A/B on the same request sets in the same pass")
    g.add_argument("--max-k", type=int, default=5, help="num_speculative_tokens: the adaptive "
                   "policies' max k (must be >= every static:K)")
    g.add_argument("--max-num-seqs", type=int, default=16,
                   help="batch slots of the started app; also the capacity run's concurrency")
    g.add_argument("--capacity-policy", default="none",
                   help="policy used to calibrate capacity and the single-stream step time")
    g.add_argument("--synthetic-acceptance", type=float, help="BENCHMARK ONLY, NOT LOSSLESS: "
                   "the started app's target accepts each draft token with this probability "
                   "(never counts toward a goal)")

    g = p.add_argument_group("SLOs (a rule fixed for the whole sweep)")
    g.add_argument("--slo-scales", type=float, nargs="+", default=[2.0, 4.0],
                   help="S: TTFT SLO = S x single-stream TTFT, TPOT SLO = S x single-stream "
                   "time per token, both of plain decoding")
    g.add_argument("--ttft-rule", choices=["per-prompt", "median"], default="per-prompt",
                   help="per-prompt (default): a request's TTFT SLO is S x the single-stream "
                   "TTFT at its own prompt length (measured at lengths spanning the mix); "
                   "median: S x the single-stream TTFT at the median prompt, for every request")
    g.add_argument("--slo-ttft-ms", type=float, help="set the TTFT SLO directly (ms), the "
                   "same for every request")
    g.add_argument("--slo-tpot-ms", type=float, help="set the TPOT SLO directly (ms)")
    g.add_argument("--calibration-from", help="reuse the calibration (single-stream figures, "
                   "capacity) of an earlier sweep's JSON, so SLOs and rates stay identical")
    g.add_argument("--attainment-target", type=float, default=0.9)

    g = p.add_argument_group("repetitions")
    g.add_argument("--repetitions", type=int, default=1, help="repetitions of every point "
                   "(each in a freshly shuffled policy order, on a new request set)")
    g.add_argument("--deciding-repetitions", type=int, default=3, help="repetitions at the "
                   "rates that decide the 90%% crossing (found after the first pass)")
    g.add_argument("--deciding-rates", type=int, default=1,
                   help="how many rates get the deciding repetitions")

    g = p.add_argument_group("run control and output")
    g.add_argument("--quick", action="store_true", help="a ~5-minute smoke run: "
                   + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    g.add_argument("--warmup-requests", type=int, default=4, help="after each switch")
    g.add_argument("--request-timeout", type=float, default=180.0)
    g.add_argument("--drain-timeout", type=float, help="seconds after the last arrival before "
                   "unfinished requests count as failed (default 60 + duration)")
    g.add_argument("--switch-timeout", type=float, default=600.0,
                   help="seconds to wait for a policy switch (first adaptive one profiles)")
    g.add_argument("--assumed-capacity", default=ASSUMED_CAPACITY, help="req/s per workload "
                   "(NAME=R,...; '*' for any), only for the duration estimate printed before "
                   f"calibration (default {ASSUMED_CAPACITY}: measured here, fp32)")
    g.add_argument("--calibrate-only", action="store_true", help="measure single-stream "
                   "figures and capacities, write them (reuse with --calibration-from), stop")
    g.add_argument("--json", help="write the report here; rewritten after every run with "
                   "\"partial\": true until the sweep ends, so an interrupted sweep keeps "
                   "what it measured")
    g.add_argument("--resume", help="an earlier (partial) report of the same sweep: its "
                   "calibration is reused and its runs are kept, not run again")
    g.add_argument("--plots-dir", help="PNG plots here (default: next to --json, else "
                   "./bench_sweep_plots)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--dry-run", action="store_true", help="print the plan and its estimated "
                   "duration, run nothing")


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo_path) as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}")
    if not values or any(not v > 0 for v in values):
        raise SystemExit(f"{flag}: values must be > 0, got {text!r}")
    return sorted(values)


def check_args(args) -> None:
    """Validate and normalise; SystemExit with a message on bad input."""
    from specserve_ray.bench.trace import TraceError, load_trace
    from specserve_ray.bench.workloads import find_trace, parse_workload

    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key, None) in (None, p_default(key)):
                setattr(args, key, value)
    args.workloads = args.workloads or DEFAULT_WORKLOADS
    args.policies = args.policies or DEFAULT_POLICIES
    args.regime = args.regime or "both"
    try:
        args.workload_specs = [parse_workload(w) for w in args.workloads]
    except ValueError as exc:
        raise SystemExit(f"--workloads: {exc}")
    if args.trace:   # the old `trace --trace FILE`: its folder holds the traces
        if not os.path.isfile(args.trace):
            raise SystemExit(f"--trace: no such file: {args.trace}")
        args.trace_dir = args.trace_dir or os.path.dirname(os.path.abspath(args.trace))
    args.trace_paths = {}
    for spec, _ in args.workload_specs:
        try:
            path = find_trace(spec.trace, args.trace_dir)
            load_trace(path, limit=2)   # columns and first rows, fail fast
        except TraceError as exc:
            raise SystemExit(f"--trace-dir: {exc}")
        args.trace_paths[spec.trace] = path
    args.bf16_note = None
    if args.url:
        if args.regime == "both":
            args.regime = "external"
        args.regimes = [args.regime]
        if args.synthetic_acceptance is not None:
            raise SystemExit("--synthetic-acceptance configures an app this tool starts; for "
                             "--url set engine.speculation.synthetic_acceptance_rate in its config")
        if not args.dashboard_url and len(args.policies) > 1:
            raise SystemExit("--url without --dashboard-url cannot switch policies: pass one "
                             "--policies entry (the live one) or a --dashboard-url")
        if not args.dashboard_url:
            # Nothing can be switched: calibrate with the live policy (the JSON says which).
            args.capacity_policy = args.policies[0]
    else:
        args.regimes = ["fp32", "bf16"] if args.regime == "both" else [args.regime]
        if "bf16" in args.regimes and not (has_native_bf16() or args.force_bf16):
            args.regimes.remove("bf16")
            args.bf16_note = ("bf16 skipped: this CPU has no native bf16 (no avx512_bf16 / "
                              "amx_bf16 flag); --force-bf16 runs it anyway")
            if not args.regimes:
                raise SystemExit(args.bf16_note)
    if args.synthetic_acceptance is not None and not 0 <= args.synthetic_acceptance <= 1:
        raise SystemExit("--synthetic-acceptance must be in [0, 1]")
    from specserve_ray.config import SpeculationConfig

    from specserve_ray.bench.policy_labels import parse_label

    for label in args.policies:
        try:
            policy, knobs = parse_label(label)
            spec = SpeculationConfig(policy=policy, num_speculative_tokens=args.max_k, **knobs)
        except Exception as exc:  # noqa: BLE001 - pydantic's message names the problem
            raise SystemExit(f"--policies: {label!r}: {exc}")
        if spec.static_k is not None and spec.static_k > args.max_k:
            raise SystemExit(f"--policies: {label} needs --max-k >= {spec.static_k}")
        if knobs and args.url and not args.dashboard_url:
            raise SystemExit(f"--policies: {label} sets knobs, which --url cannot switch "
                             "without --dashboard-url")
    args.policies = [p.strip().lower() for p in args.policies]
    if len(set(args.policies)) != len(args.policies):
        raise SystemExit("--policies: each policy once")
    if args.rates:
        args.load_levels = [(f"{r:g}/s", None, r) for r in _floats(args.rates, "--rates")]
    else:
        args.load_levels = [(f"x{f:g}", f, None)
                            for f in _floats(args.loads or DEFAULT_LOADS, "--loads")]
    values = [frac or rate for _, frac, rate in args.load_levels]
    args.run_levels = list(range(len(values)))
    if args.only_loads:
        wanted = set(_floats(args.only_loads, "--only-loads"))
        if wanted - set(values):
            raise SystemExit(f"--only-loads: {sorted(wanted - set(values))} not in the "
                             f"sweep's list {values}")
        args.run_levels = [i for i, v in enumerate(values) if v in wanted]
    if args.duration <= 0 or args.min_requests < 1 or args.max_requests < args.min_requests:
        raise SystemExit("need --duration > 0 and 1 <= --min-requests <= --max-requests")
    if args.burstiness <= 0:
        raise SystemExit("--burstiness must be > 0")
    if args.repetitions < 1 or args.deciding_repetitions < 1 or args.deciding_rates < 0:
        raise SystemExit("--repetitions and --deciding-repetitions must be >= 1")
    if not 0 < args.attainment_target <= 1:
        raise SystemExit("--attainment-target must be in (0, 1]")
    if any(not s > 0 for s in args.slo_scales):
        raise SystemExit("--slo-scales must be > 0")
    for flag in ("slo_ttft_ms", "slo_tpot_ms"):
        v = getattr(args, flag)
        if v is not None and not v > 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be > 0")
    try:
        args.assumed_capacity = {k.strip(): float(v) for k, _, v in
                                 (p.partition("=") for p in args.assumed_capacity.split(","))}
        if any(not v > 0 for v in args.assumed_capacity.values()):
            raise ValueError
    except (ValueError, AttributeError):
        raise SystemExit("--assumed-capacity: expected NAME=REQ_PER_S,... with values > 0")
    if args.calibration_from and not os.path.isfile(args.calibration_from):
        raise SystemExit(f"--calibration-from: no such file: {args.calibration_from}")
    if args.resume and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume: no such file: {args.resume}")
    if args.resume and args.calibration_from:
        raise SystemExit("--resume reuses the earlier report's calibration; drop "
                         "--calibration-from")
    if not args.plots_dir:
        args.plots_dir = (os.path.splitext(args.json)[0] + "_plots" if args.json
                          else "bench_sweep_plots")


_DEFAULTS = {"duration": 60.0, "min_requests": 60, "deciding_repetitions": 3,
             "warmup_requests": 4}


def p_default(key: str):
    return _DEFAULTS.get(key)
