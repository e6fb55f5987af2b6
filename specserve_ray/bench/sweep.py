"""`bench trace`: policies x load levels x cost regimes against one deployment per regime.

Per regime (target dtype bf16 or fp32) it starts the default app (or uses `--url`), then
calibrates on it: single-stream TTFT and TPOT with plain decoding (the SLO defaults are
multiples of these) and the capacity in req/s of the trace's request mix with
`max_num_seqs` closed-loop clients (load levels are fractions of it). Then, for every load
level and every policy: switch the policy through reconfigure, warm up, replay the same
requests (same prompts, same arrival times), and diff the router's /v1/stats around the run.
"""
from __future__ import annotations

import asyncio
import math
import os
import statistics
import time

from specserve_ray.bench import trace as tr
from specserve_ray.bench.control import (HandleSwitcher, RestSwitcher, start_app,
                                         wait_for_policy)
from specserve_ray.bench.loadgen import get_json, run_closed_loop, run_open_loop
from specserve_ray.bench.report import SLO, markdown_table, run_entry, run_metrics, server_delta

REGIME_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# Rough fixed costs for the duration estimate (this 2-core CPU; measured on the smoke run).
APP_START_S, CALIBRATION_S, PROFILE_S, PER_RUN_OVERHEAD_S = 30.0, 35.0, 25.0, 6.0


def parse_loads(text: str) -> list[tuple[str, float]]:
    """'low=0.3,medium=0.7,overload=1.3' -> [(name, fraction of capacity)]."""
    out = []
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            frac = float(value)
        except ValueError:
            frac = -1.0
        if not sep or not name or not frac > 0:
            raise SystemExit(f"--loads: expected NAME=FRACTION,... with fractions > 0, got {part!r}")
        out.append((name, frac))
    return out


def estimate_seconds(args, n_regimes: int) -> float:
    n_runs = len(args.policies) * len(args.load_levels)
    # Overload leaves a backlog to drain after the last arrival (absolute rates: unknown).
    drain = max(0.0, max((f or 1.0) for _, f, _ in args.load_levels) - 1.0) * args.duration
    per_run = PER_RUN_OVERHEAD_S + args.duration + 0.5 * drain + 2.0
    adaptive = any(p.split(":")[0] in ("smartspec", "specserve") for p in args.policies)
    start = 0.0 if args.url else APP_START_S
    return n_regimes * (start + CALIBRATION_S + (PROFILE_S if adaptive else 0) + n_runs * per_run)


BENCH_SLO_CLASS = "bench"


class Sweep:
    def __init__(self, args, tokenizer, prompts, full_trace):
        self.args = args
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.trace = full_trace
        self.slo_class: str | None = None    # sent with every measured request, if set

    # -- workloads ----------------------------------------------------------------------------
    def fit(self, reqs, max_model_len: int):
        a = self.args
        budget = min(a.input_budget, max_model_len - min(a.max_output_tokens, max_model_len // 4))
        scale = (tr.auto_input_scale(self.trace, budget) if a.input_scale == "auto"
                 else float(a.input_scale))
        return tr.fit_lengths(reqs, max_model_len, input_scale=scale, output_scale=a.output_scale,
                              max_input_tokens=a.max_input_tokens,
                              max_output_tokens=a.max_output_tokens), scale

    def workload(self, rate: float, max_model_len: int):
        a = self.args
        n = min(a.max_requests, max(a.min_requests, math.ceil(rate * a.duration)))
        reqs, _ = self.fit(tr.window(self.trace, a.trace_start, n), max_model_len)
        if a.arrival == "trace":
            reqs = (tr.scale_time(reqs, a.time_scale) if a.time_scale
                    else tr.scale_to_rate(reqs, rate))
        else:
            burst = 1.0 if a.arrival == "poisson" else a.burstiness
            reqs = tr.with_arrivals(reqs, tr.gamma_arrivals(rate, n, burst, seed=a.seed))
        prompts = self.prompts.prompts([r.input_tokens for r in reqs])
        return reqs, prompts

    # -- calibration --------------------------------------------------------------------------
    async def calibrate(self, url, switcher, model, max_model_len: int, max_num_seqs: int) -> dict:
        a = self.args
        await self.switch(url, switcher, a.capacity_policy)
        sample, _ = self.fit(tr.window(self.trace, a.trace_start, 3 * max_num_seqs), max_model_len)
        median_in = int(statistics.median(r.input_tokens for r in sample))
        single_prompts = self.prompts.prompts([median_in] * 4, offset=10_000)
        await run_closed_loop(url, single_prompts[:1], [median_in], [8], 1, model)   # warm-up
        recs, _ = await run_closed_loop(url, single_prompts, [median_in] * 4, [32] * 4, 1, model,
                                        a.request_timeout)
        ok = [r for r in recs if r.ok]
        if not ok:
            raise RuntimeError(f"calibration requests failed: {[r.error for r in recs]}")
        tpot1 = statistics.median(r.tpot for r in ok)
        ttft1 = statistics.median(r.ttft for r in ok)
        cap_prompts = self.prompts.prompts([r.input_tokens for r in sample], offset=20_000)
        recs, seconds = await run_closed_loop(
            url, cap_prompts, [r.input_tokens for r in sample], [r.output_tokens for r in sample],
            max_num_seqs, model, a.request_timeout)
        done = sum(r.ok for r in recs)
        capacity = done / seconds if done else 0.0
        if capacity <= 0:
            raise RuntimeError("capacity run completed no request")
        slo = SLO(ttft_s=a.slo_ttft if a.slo_ttft else max(a.slo_ttft_factor * ttft1,
                                                             10 * tpot1),
                  tpot_s=a.slo_tpot if a.slo_tpot else a.slo_tpot_factor * tpot1)
        return {"policy": a.capacity_policy, "single_stream_tpot_s": tpot1,
                "single_stream_ttft_s": ttft1, "median_input_tokens": median_in,
                "capacity_req_s": capacity, "capacity_concurrency": max_num_seqs,
                "capacity_tok_s": sum(r.output_tokens for r in recs if r.ok) / seconds,
                "slo_ttft_s": slo.ttft_s, "slo_tpot_s": slo.tpot_s}

    # -- one run ------------------------------------------------------------------------------
    async def switch(self, url, switcher, policy: str) -> None:
        if switcher is not None:
            await switcher.switch(policy, self.args.max_k)
        await wait_for_policy(url, policy, timeout_s=self.args.switch_timeout)

    async def warm_up(self, url, model) -> None:
        n = self.args.warmup_requests
        if n > 0:
            prompts = self.prompts.prompts([32] * n, offset=30_000)
            await run_closed_loop(url, prompts, [32] * n, [16] * n, n, model,
                                  self.args.request_timeout)

    async def run_one(self, url, switcher, model, policy, reqs, prompts, progress):
        a = self.args
        await self.switch(url, switcher, policy)
        await self.warm_up(url, model)
        before = await get_json(url, "/v1/stats")
        records, duration = await run_open_loop(
            url, prompts, [r.input_tokens for r in reqs], [r.output_tokens for r in reqs],
            [r.arrival_s for r in reqs], model, a.request_timeout,
            drain_s=a.drain_timeout if a.drain_timeout else 60.0 + a.duration,
            progress=progress, slo_class=self.slo_class)
        after = await get_json(url, "/v1/stats")
        return records, duration, before, after


def _policy_label(policy: str) -> str:
    return policy.strip().lower()


def run(args) -> dict:
    """The whole sweep; returns the report (written to --json by the CLI)."""
    from specserve_ray.bench.args import check_args

    check_args(args)
    regimes = args.regimes
    est = estimate_seconds(args, len(regimes))
    print(f"trace sweep: {len(regimes)} regime(s) x {len(args.load_levels)} load level(s) x "
          f"{len(args.policies)} policies, {args.duration:.0f} s of arrivals per run; "
          f"estimated {est / 60:.1f} min", flush=True)
    if args.dry_run:
        return {"setup": _setup(args), "estimated_s": est, "runs": []}

    from tqdm import tqdm

    from specserve_ray.bench.workload import PromptSource, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    sweep = Sweep(args, tokenizer, PromptSource(tokenizer, args.seed),
                  tr.load_trace(args.trace))
    report = {"setup": _setup(args), "estimated_s": est, "calibration": {}, "runs": [],
              "errors": []}
    t_start = time.monotonic()
    bar = tqdm(total=len(regimes) * len(args.load_levels) * len(args.policies), desc="runs",
               unit="run", position=0)
    for regime in regimes:
        stop = None
        try:
            if args.url:
                url, switcher = args.url.rstrip("/"), (RestSwitcher(args.dashboard_url)
                                                      if args.dashboard_url else None)
            else:
                bar.set_description(f"starting app ({regime})")
                url, handle, stop = start_app(REGIME_DTYPES[regime], args.max_k,
                                              args.synthetic_acceptance, args.max_num_seqs)
                switcher = HandleSwitcher(handle)
            _run_regime(sweep, regime, url, switcher, report, bar)
        finally:
            if stop is not None:
                stop()
    bar.close()
    report["elapsed_s"] = time.monotonic() - t_start
    runs = report["runs"]
    report["table_markdown"] = markdown_table(runs)
    print("\n" + report["table_markdown"] + "\n")
    if report["errors"]:
        print(f"{len(report['errors'])} run(s) failed: see 'errors' in the report")
    if not args.no_plots and runs:
        from specserve_ray.bench.plots import write_plots

        report["plots"] = write_plots(runs, args.plots_dir)
        for p in report["plots"]:
            print(f"wrote {p}")
    print(f"sweep took {report['elapsed_s'] / 60:.1f} min (estimated {est / 60:.1f})")
    return report


def _run_regime(sweep: Sweep, regime: str, url: str, switcher, report: dict, bar) -> None:
    from tqdm import tqdm

    args = sweep.args
    models = asyncio.run(get_json(url, "/v1/models"))["data"][0]
    model = args.model or models["id"]
    max_model_len = args.max_model_len or models.get("max_model_len")
    if not max_model_len:
        raise SystemExit("the endpoint's /v1/models does not report max_model_len; "
                         "pass --max-model-len")
    stats = asyncio.run(get_json(url, "/v1/stats"))
    synthetic = stats.get("synthetic_acceptance_rate", args.synthetic_acceptance)
    bar.set_description(f"calibrating ({regime})")
    cal = asyncio.run(sweep.calibrate(url, switcher, model, max_model_len, args.max_num_seqs))
    cal["max_model_len"] = max_model_len
    report["calibration"][regime] = cal
    slo = SLO(cal["slo_ttft_s"], cal["slo_tpot_s"])
    sweep.slo_class = None
    if switcher is not None:
        # The benchmark's SLO becomes a server-side class every measured request names,
        # so SLO-aware policies (specserve) see the budget the goodput is judged by;
        # the other policies ignore it. Without a switcher (--url alone) nothing is sent.
        asyncio.run(switcher.apply({"slo": {"classes": [
            {"name": BENCH_SLO_CLASS, "ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}]}}))
        sweep.slo_class = BENCH_SLO_CLASS
    cal["slo_class_sent"] = sweep.slo_class
    tqdm.write(f"[{regime}] single stream: TTFT {cal['single_stream_ttft_s'] * 1000:.0f} ms, "
               f"TPOT {cal['single_stream_tpot_s'] * 1000:.1f} ms; capacity "
               f"{cal['capacity_req_s']:.2f} req/s ({cal['capacity_tok_s']:.0f} out tok/s); "
               f"SLOs: TTFT <= {slo.ttft_s:.3f} s, TPOT <= {slo.tpot_s * 1000:.0f} ms")
    levels = []
    for load, frac, abs_rate in args.load_levels:
        if frac:
            rate = frac * cal["capacity_req_s"]
        elif abs_rate:
            rate = abs_rate
        else:   # --time-scale: the trace window's own rate, scaled
            rate = tr.mean_rate(tr.window(sweep.trace, args.trace_start, 200)) / args.time_scale
        reqs, prompts = sweep.workload(rate, max_model_len)
        levels.append((load, frac, reqs, prompts))
    # Now the arrival spans are known (--min-requests can stretch a low-load run).
    span = sum(r[-1].arrival_s for _, _, r, _ in levels)
    tqdm.write(f"[{regime}] arrivals: {span:.0f} s per policy; this regime's runs need about "
               f"{len(args.policies) * (span + len(levels) * (PER_RUN_OVERHEAD_S + 2)) / 60:.1f} min")
    for load, frac, reqs, prompts in levels:
        offered = tr.mean_rate(reqs) if len(reqs) > 1 else 0.0
        for policy in args.policies:
            bar.set_description(f"{regime} {load} {policy}")
            inner = tqdm(total=len(reqs), desc="  requests", unit="req", leave=False, position=1)
            try:
                records, duration, before, after = asyncio.run(sweep.run_one(
                    url, switcher, model, policy, reqs, prompts, inner))
            except Exception as exc:   # noqa: BLE001 - one failed run must not lose the sweep
                report["errors"].append({"regime": regime, "load": load, "policy": policy,
                                         "error": f"{type(exc).__name__}: {exc}"})
                tqdm.write(f"[{regime}] {load} {policy}: FAILED {exc}")
                continue
            finally:
                inner.close()
                bar.update(1)
            metrics = run_metrics(records, duration, slo)
            server = server_delta(before, after)
            entry = run_entry(regime, _policy_label(policy), load, frac or None, offered,
                              args.arrival, synthetic, metrics, server,
                              [r.tpot for r in records if r.ok and r.tpot is not None])
            report["runs"].append(entry)
            tqdm.write(f"[{regime}] {load:>9} {policy:>10}: goodput {metrics['goodput_req_s']:.2f} "
                       f"req/s, SLO {metrics['slo_attainment']:.2f}, {metrics['output_tok_s']:.1f} "
                       f"tok/s, TPOT p50 {_ms(metrics['tpot_p50_s'])}, accept len "
                       f"{_f(server.get('mean_acceptance_length'))}, mean k "
                       f"{_f(server.get('mean_chosen_k'))}, failed {metrics['failed']}")


def _ms(v):
    return "-" if v is None else f"{v * 1000:.0f} ms"


def _f(v):
    return "-" if v is None else f"{v:.2f}"


def _setup(args) -> dict:
    keys = ("trace", "url", "dashboard_url", "regimes", "policies", "max_k", "load_levels",
            "arrival", "burstiness", "time_scale", "duration", "min_requests", "max_requests",
            "trace_start", "input_scale", "input_budget", "output_scale", "max_input_tokens",
            "max_output_tokens", "slo_ttft", "slo_tpot", "slo_ttft_factor", "slo_tpot_factor",
            "warmup_requests", "synthetic_acceptance", "capacity_policy", "max_num_seqs", "seed")
    return {k: getattr(args, k, None) for k in keys}
