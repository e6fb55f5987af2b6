"""Command-line options of `bench trace` and their checks (clear errors, before any work)."""
from __future__ import annotations

import os

DEFAULT_POLICIES = ["none", "static:1", "static:3", "static:5", "threshold", "smartspec",
                    "specserve"]


def add_arguments(p) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--trace", required=True, help="Azure LLM inference trace CSV (TIMESTAMP, "
                   "ContextTokens, GeneratedTokens); its lengths are used for every arrival mode")
    g.add_argument("--arrival", choices=["trace", "poisson", "gamma"], default="trace",
                   help="arrival times: the trace's own (time-scaled to each load's rate), or "
                   "Poisson / gamma at that rate")
    g.add_argument("--burstiness", type=float, default=0.5, help="gamma shape (1 = Poisson, "
                   "< 1 burstier: CV = 1/sqrt(burstiness))")
    g.add_argument("--loads", default="low=0.3,medium=0.7,overload=1.3",
                   help="load levels as NAME=FRACTION of the measured capacity")
    g.add_argument("--rates", help="absolute request rates instead, e.g. 0.5,1,2 (req/s)")
    g.add_argument("--time-scale", type=float, help="replay the trace window with arrival "
                   "times multiplied by this (one load level; overrides --loads)")
    g.add_argument("--duration", type=float, default=15.0,
                   help="seconds of arrivals per run (sets the request count: rate x duration)")
    g.add_argument("--min-requests", type=int, default=16)
    g.add_argument("--max-requests", type=int, default=400)
    g.add_argument("--trace-start", type=float, default=0.0,
                   help="start of the trace window (seconds into the trace)")
    g.add_argument("--input-scale", default="auto", help="multiply context lengths by this; "
                   "'auto' maps the trace's p99 context onto --input-budget")
    g.add_argument("--input-budget", type=int, default=256, help="tokens the p99 context maps "
                   "to with --input-scale auto (capped by max_model_len - output cap). 256 "
                   "keeps this CPU's one-at-a-time prefill (~0.5 s at 900 tokens) from "
                   "dominating the decode steps that speculation acts on; raise it on a GPU")
    g.add_argument("--output-scale", type=float, default=1.0)
    g.add_argument("--max-input-tokens", type=int)
    g.add_argument("--max-output-tokens", type=int, default=128,
                   help="cap on generated tokens per request (the code trace's p99 is ~250)")
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
    g.add_argument("--regime", choices=["bf16", "fp32", "both"], default="both",
                   help="target dtype of the started app (bf16: verification nearly free per "
                   "token, fp32: cost grows with tokens); with --url only a label")
    g.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    g.add_argument("--max-k", type=int, default=5, help="num_speculative_tokens: the adaptive "
                   "policies' max k (must be >= every static:K)")
    g.add_argument("--max-num-seqs", type=int, default=16,
                   help="batch slots of the started app; also the capacity run's concurrency")
    g.add_argument("--capacity-policy", default="none",
                   help="policy used to calibrate capacity and the single-stream step time")
    g.add_argument("--synthetic-acceptance", type=float, help="BENCHMARK ONLY, NOT LOSSLESS: "
                   "the started app's target accepts each draft token with this probability")

    g = p.add_argument_group("SLOs (defaults relative to the measured single stream)")
    g.add_argument("--slo-ttft", type=float, help="TTFT SLO in seconds")
    g.add_argument("--slo-tpot", type=float, help="TPOT SLO in seconds")
    g.add_argument("--slo-ttft-factor", type=float, default=5.0,
                   help="default TTFT SLO = max(this x single-stream TTFT, 10 x its TPOT)")
    g.add_argument("--slo-tpot-factor", type=float, default=3.0,
                   help="default TPOT SLO = this x single-stream TPOT of plain decoding")

    g = p.add_argument_group("run control and output")
    g.add_argument("--warmup-requests", type=int, default=4, help="after each switch")
    g.add_argument("--request-timeout", type=float, default=120.0)
    g.add_argument("--drain-timeout", type=float, help="seconds after the last arrival before "
                   "unfinished requests count as failed (default 60 + duration)")
    g.add_argument("--switch-timeout", type=float, default=600.0,
                   help="seconds to wait for a policy switch (first adaptive one profiles)")
    g.add_argument("--json", help="write the report here")
    g.add_argument("--plots-dir", help="PNG plots here (default: next to --json, else "
                   "./bench_trace_plots)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--dry-run", action="store_true", help="print the plan and its estimated "
                   "duration, run nothing")


def check_args(args) -> None:
    """Validate and normalise; SystemExit with a message on bad input."""
    from specserve_ray.bench.sweep import parse_loads

    if not os.path.isfile(args.trace):
        raise SystemExit(f"--trace: no such file: {args.trace}")
    from specserve_ray.bench.trace import TraceError, load_trace

    try:
        load_trace(args.trace, limit=2)   # columns and first rows, fail fast
    except TraceError as exc:
        raise SystemExit(f"--trace: {exc}")
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
    else:
        args.regimes = ["bf16", "fp32"] if args.regime == "both" else [args.regime]
    if args.synthetic_acceptance is not None and not 0 <= args.synthetic_acceptance <= 1:
        raise SystemExit("--synthetic-acceptance must be in [0, 1]")
    from specserve_ray.config import SpeculationConfig

    for policy in args.policies:
        try:
            spec = SpeculationConfig(policy=policy, num_speculative_tokens=args.max_k)
        except Exception as exc:  # noqa: BLE001 - pydantic's message names the problem
            raise SystemExit(f"--policies: {policy!r}: {exc}")
        if spec.static_k is not None and spec.static_k > args.max_k:
            raise SystemExit(f"--policies: {policy} needs --max-k >= {spec.static_k}")
    args.policies = [p.strip().lower() for p in args.policies]
    if args.rates:
        try:
            rates = [float(x) for x in args.rates.split(",")]
        except ValueError:
            raise SystemExit(f"--rates: expected numbers, got {args.rates!r}")
        if any(not r > 0 for r in rates):
            raise SystemExit("--rates must be > 0")
        args.load_levels = [(f"{r:g}/s", None, r) for r in rates]
    elif args.time_scale:
        if args.arrival != "trace" or not args.time_scale > 0:
            raise SystemExit("--time-scale needs --arrival trace and a factor > 0")
        args.load_levels = [(f"x{args.time_scale:g}", None, None)]
    else:
        args.load_levels = [(n, f, None) for n, f in parse_loads(args.loads)]
    if args.input_scale != "auto":
        try:
            if not float(args.input_scale) > 0:
                raise ValueError
        except ValueError:
            raise SystemExit("--input-scale must be 'auto' or a number > 0")
    if args.duration <= 0 or args.min_requests < 1 or args.max_requests < args.min_requests:
        raise SystemExit("need --duration > 0 and 1 <= --min-requests <= --max-requests")
    if args.burstiness <= 0:
        raise SystemExit("--burstiness must be > 0")
    if not args.plots_dir:
        args.plots_dir = (os.path.splitext(args.json)[0] + "_plots" if args.json
                          else "bench_trace_plots")
