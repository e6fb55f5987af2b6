"""`bench sweep` (alias `trace`): policies x rates x workloads x regimes, repeated, paired.

Per regime (target dtype fp32 or bf16) it starts the default app once (or uses `--url`);
per workload it calibrates with plain decoding: single-stream TTFT and time per token at the
workload's median prompt (the SLO rule's base) and the closed-loop capacity of the workload's
request mix (rates are fractions of it). Then for every rate and repetition it draws one
request set and runs every policy on it, in a freshly shuffled order, through the router's
live reconfigure. After the first pass, the rates that decide the 90%-attainment crossing get
extra repetitions. Requests are sent by a separate client process at nice 19 (client.py).
Conclusions (max rate at 90%, paired differences, curves) are computed by aggregate.py from
the per-request samples kept in the JSON.
"""
from __future__ import annotations

import asyncio
import statistics
import time
import zlib

import numpy as np

from specserve_ray.bench import aggregate as agg
from specserve_ray.bench import slo_rule as sr
from specserve_ray.bench import trace as tr
from specserve_ray.bench import workloads as wl
from specserve_ray.bench.sweep_file import checkpoint, load_resumable, prior_calibration, \
    sweep_setup
from specserve_ray.bench.sweep_plan import cell_estimate, cell_workloads, estimate_seconds
from specserve_ray.bench.report import markdown_table, outcomes, run_entry, run_metrics, \
    server_delta

REGIME_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# Where the per-prompt TTFT rule measures single-stream TTFT: quantiles of the workload's
# prompt lengths (the shortest and longest of the calibration sample included), 3 requests each.
TTFT_CURVE_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
TTFT_CURVE_REPEATS = 3


def seed_for(*parts) -> int:
    """A stable 32-bit seed from ints and strings (request sets, policy orders)."""
    ints = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


class Sweep:
    def __init__(self, args, client, prompts, traces: dict):
        self.args = args
        self.client = client          # ClientProcess: requests leave from a niced child
        self.prompts = prompts
        self.traces = traces          # {"code": rows, "conv": rows}
        self.slo_class: str | None = None
        self.capacity: dict = {}      # (regime, workload name) -> measured req/s

    def requests(self, spec, arrival, rate, count, seed, max_model_len):
        a = self.args
        return wl.make_requests(spec, arrival, self.traces[spec.trace], rate, count, seed,
                                max_model_len, a.input_budget, a.burstiness)

    def calibration_sample(self, spec, arrival, max_model_len, max_num_seqs):
        """The workload's requests calibration measures (capacity run, TTFT curve)."""
        return self.requests(spec, arrival, 1.0, 3 * max_num_seqs,
                             seed_for(self.args.seed, "cal"), max_model_len)

    async def switch(self, url, switcher, policy: str) -> None:
        from specserve_ray.bench.control import wait_for_policy

        from specserve_ray.bench.policy_labels import parse_label, switch_config
        from specserve_ray.config import SpeculationConfig

        if switcher is not None:
            defaults = {k: f.default for k, f in SpeculationConfig.model_fields.items()}
            await switcher.apply(switch_config(policy, self.args.policies, self.args.max_k,
                                               defaults))
        await wait_for_policy(url, parse_label(policy)[0], timeout_s=self.args.switch_timeout)

    def calibrate(self, url, switcher, model, spec, arrival, max_model_len, max_num_seqs) -> dict:
        """Single-stream TTFT/TPOT of plain decoding and closed-loop capacity, this workload."""
        a = self.args
        asyncio.run(self.switch(url, switcher, a.capacity_policy))
        sample = self.calibration_sample(spec, arrival, max_model_len, max_num_seqs)
        median_in = int(statistics.median(r.input_tokens for r in sample))
        out_single = max(2, min(64, max_model_len - median_in - 1))
        single = self.prompts.prompts([median_in] * 5, offset=10_000)
        common = {"url": url, "model": model, "timeout_s": a.request_timeout}
        self.client.closed_loop(prompts=single[:1], input_tokens=[median_in],
                                output_tokens=[8], concurrency=1, **common)   # warm-up
        recs = self.client.closed_loop(prompts=single[1:], input_tokens=[median_in] * 4,
                                       output_tokens=[out_single] * 4, concurrency=1,
                                       **common)["records"]
        ok = [r for r in recs if r.ok]
        if not ok:
            raise RuntimeError(f"calibration requests failed: {[r.error for r in recs]}")
        curve = self.ttft_curve(url, model, sample)
        cap_prompts = self.prompts.prompts([r.input_tokens for r in sample], offset=20_000)
        res = self.client.closed_loop(prompts=cap_prompts,
                                      input_tokens=[r.input_tokens for r in sample],
                                      output_tokens=[r.output_tokens for r in sample],
                                      concurrency=max_num_seqs, **common)
        done = [r for r in res["records"] if r.ok]
        if not done:
            raise RuntimeError("capacity run completed no request")
        return {"policy": a.capacity_policy, "single_stream_ttft_s": statistics.median(
                    r.ttft for r in ok),
                "single_stream_tpot_s": statistics.median(r.tpot for r in ok),
                "single_stream_input_tokens": median_in, "single_stream_output_tokens":
                    out_single, "single_stream_ttft_by_prompt": curve,
                "capacity_req_s": len(done) / res["duration"],
                "capacity_tok_s": sum(r.output_tokens for r in done) / res["duration"],
                "capacity_concurrency": max_num_seqs, "capacity_requests": len(sample),
                "mix": wl.length_summary(sample)}

    def ttft_curve(self, url, model, sample) -> list:
        """[prompt tokens, single-stream TTFT s] for the per-prompt TTFT rule: one request at
        a time (plain decoding must already be switched on), at quantiles of the sample's
        prompt lengths, TTFT_CURVE_REPEATS requests each (slo_rule.monotone_curve takes
        the median)."""
        lengths = sorted({int(np.quantile([r.input_tokens for r in sample], q))
                          for q in TTFT_CURVE_QUANTILES})
        asked = [n for n in lengths for _ in range(TTFT_CURVE_REPEATS)]
        prompts = self.prompts.prompts(asked, offset=15_000)
        recs = self.client.closed_loop(url=url, model=model, prompts=prompts,
                                       input_tokens=asked, output_tokens=[2] * len(asked),
                                       concurrency=1, timeout_s=self.args.request_timeout
                                       )["records"]
        points = [[r.input_tokens, round(r.ttft, 5)] for r in recs if r.ok]
        if {p for p, _ in points} != set(lengths):
            raise RuntimeError(f"TTFT calibration requests failed: "
                               f"{[r.error for r in recs if not r.ok][:3]}")
        return points

    def run_one(self, url, switcher, model, policy, reqs, prompts, desc):
        a = self.args
        asyncio.run(self.switch(url, switcher, policy))
        n = a.warmup_requests
        if n > 0:
            warm = self.prompts.prompts([32] * n, offset=30_000)
            self.client.closed_loop(url=url, prompts=warm, input_tokens=[32] * n,
                                    output_tokens=[16] * n, concurrency=n, model=model,
                                    timeout_s=a.request_timeout)
        before = self.client.get_json(url, "/v1/stats")
        res = self.client.open_loop(
            desc=desc, url=url, prompts=prompts, input_tokens=[r.input_tokens for r in reqs],
            output_tokens=[r.output_tokens for r in reqs], arrivals=[r.arrival_s for r in reqs],
            model=model, timeout_s=a.request_timeout,
            drain_s=a.drain_timeout if a.drain_timeout else 60.0 + a.duration,
            slo_class=self.slo_class)
        after = self.client.get_json(url, "/v1/stats")
        return res, before, after


def run(args) -> dict:
    """The whole sweep; returns the report (written to --json by the CLI)."""
    from specserve_ray.bench.args import check_args

    check_args(args)
    est = estimate_seconds(args)
    n_cells = sum(len(cell_workloads(args, r)) for r in args.regimes)
    print(f"sweep: {len(args.regimes)} regime(s), {n_cells} (regime, workload) cell(s) x "
          f"{len(args.run_levels)} rate(s) x {len(args.policies)} policies x "
          f"{args.repetitions} repetition(s) (+{max(0, args.deciding_repetitions - args.repetitions)}"
          f" at {args.deciding_rates} deciding rate(s)); >= {args.min_requests} requests and "
          f">= {args.duration:.0f} s per point; estimated {est / 60:.0f} min at assumed "
          f"capacities {args.assumed_capacity} req/s", flush=True)
    if args.bf16_note:
        print(args.bf16_note)
    rule_text = (sr.SLO_RULE_TEXT_PER_PROMPT if args.ttft_rule == "per-prompt"
                 and args.slo_ttft_ms is None else sr.SLO_RULE_TEXT)
    report = {"setup": sweep_setup(args), "estimated_s": est, "slo_rule": rule_text,
              "notes": [n for n in (args.bf16_note,) if n], "runs": []}
    if args.dry_run:
        return report

    from tqdm import tqdm

    from specserve_ray.bench.client import ClientProcess, server_worker_nice
    from specserve_ray.bench.workload import PromptSource, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    traces = {name: tr.load_trace(path) for name, path in args.trace_paths.items()}
    report.update({"calibration": {}, "slos": [], "samples": {}, "errors": []})
    if args.resume:
        earlier = load_resumable(args.resume, report["setup"])
        prior = earlier.get("calibration", {})
        report["runs"], report["samples"] = earlier["runs"], earlier["samples"]
        print(f"resuming {args.resume}: {len(earlier['samples'])} run(s) kept")
    else:
        prior = prior_calibration(args.calibration_from)
    t_start = time.monotonic()
    planned = sum(len(cell_workloads(args, r)) for r in args.regimes) * \
        len(args.run_levels) * len(args.policies) * args.repetitions
    bar = tqdm(total=0 if args.calibrate_only else planned, desc="runs", unit="run", position=0)
    with ClientProcess() as client:
        sweep = Sweep(args, client, PromptSource(tokenizer, args.seed), traces)
        for regime in args.regimes:
            _run_regime(sweep, regime, report, prior, bar)
        report["client"] = {**client.summary(), "server_worker_nice": server_worker_nice()}
    bar.close()
    report["elapsed_s"] = time.monotonic() - t_start
    report["partial"] = False
    _conclude(args, report)
    print(f"sweep took {report['elapsed_s'] / 60:.1f} min (estimated {est / 60:.1f})")
    return report


def _conclude(args, report: dict) -> None:
    runs, samples = report["runs"], report["samples"]
    if not runs:
        return
    reference = "specserve" if "specserve" in args.policies else args.policies[0]
    report["max_rate_at_90"] = agg.max_rates(runs, samples, args.attainment_target)
    report["paired"] = agg.paired(runs, samples, reference)
    report["curves"] = agg.curves(runs, samples)
    report["table_markdown"] = agg.curve_table(report["curves"])
    report["max_rate_table_markdown"] = agg.max_rate_table(report["max_rate_at_90"])
    report["runs_table_markdown"] = markdown_table(runs)
    print("\n" + report["table_markdown"] + "\n\n" + report["max_rate_table_markdown"] + "\n")
    c = report.get("client", {})
    print(f"client: own process at nice {c.get('nice')}, {c.get('cpu_s')} CPU s over "
          f"{c.get('wall_s')} s ({c.get('cpu_share_of_one_core')} of one core)")
    if report["errors"]:
        print(f"{len(report['errors'])} run(s) failed: see 'errors' in the report")
    if not args.no_plots:
        from specserve_ray.bench.plots import write_plots

        report["plots"] = write_plots(report["curves"], runs, args.plots_dir)
        for p in report["plots"]:
            print(f"wrote {p}")


def _run_regime(sweep: Sweep, regime: str, report: dict, prior: dict, bar) -> None:
    from tqdm import tqdm

    from specserve_ray.bench.control import (HandleSwitcher, RestSwitcher, get_json,
                                             start_sweep_app)

    args = sweep.args
    stop = None
    try:
        if args.url:
            url = args.url.rstrip("/")
            switcher = RestSwitcher(args.dashboard_url) if args.dashboard_url else None
            if switcher is not None:
                asyncio.run(switcher.apply({"drafter": args.drafter}))
        else:
            bar.set_description(f"starting app ({regime})")
            url, handle, stop = start_sweep_app(REGIME_DTYPES[regime], args.max_k,
                                                args.synthetic_acceptance, args.max_num_seqs,
                                                drafter=args.drafter)
            switcher = HandleSwitcher(handle)
        models = asyncio.run(get_json(url, "/v1/models"))["data"][0]
        model = args.model or models["id"]
        max_model_len = args.max_model_len or models.get("max_model_len")
        if not max_model_len:
            raise SystemExit("the endpoint's /v1/models does not report max_model_len; "
                             "pass --max-model-len")
        stats = asyncio.run(get_json(url, "/v1/stats"))
        synthetic = stats.get("synthetic_acceptance_rate", args.synthetic_acceptance)
        for wi, (spec, arrival) in enumerate(cell_workloads(args, regime)):
            label = f"{spec.name}:{arrival}" if arrival != "replay" else spec.name
            bar.set_description(f"calibrating {regime} {label}")
            cal = (prior.get(regime, {}).get(label) or
                   sweep.calibrate(url, switcher, model, spec, arrival, max_model_len,
                                   args.max_num_seqs))
            cal = {**cal, "max_model_len": max_model_len}
            if args.ttft_rule == "per-prompt" and not cal.get("single_stream_ttft_by_prompt"):
                # A calibration from before the per-prompt rule: measure only its curve now.
                asyncio.run(sweep.switch(url, switcher, args.capacity_policy))
                cal["single_stream_ttft_by_prompt"] = sweep.ttft_curve(
                    url, model, sweep.calibration_sample(spec, arrival, max_model_len,
                                                         args.max_num_seqs))
                cal["ttft_curve_measured_later"] = True
            report["calibration"].setdefault(regime, {})[label] = cal
            rules = sr.slo_rules(cal["single_stream_ttft_s"], cal["single_stream_tpot_s"],
                                 args.slo_scales, args.slo_ttft_ms, args.slo_tpot_ms,
                                 cal["single_stream_ttft_by_prompt"]
                                 if args.ttft_rule == "per-prompt" else None)
            report["slos"] += [{"regime": regime, "workload": label, **r.as_json()}
                               for r in rules]
            sweep.slo_class = None
            if switcher is not None:
                # The tightest SLO becomes a server-side class every measured request names,
                # so the SLO-aware policy (specserve) sees a budget goodput is judged by.
                tight = min(rules, key=lambda r: r.tpot_ms)
                cls = sr.bench_slo_class(tight)
                asyncio.run(switcher.apply({"slo": {"classes": [cls]}}))
                sweep.slo_class = sr.BENCH_SLO_CLASS
                cal["slo_class_sent"] = cls
            tqdm.write(f"[{regime} {label}] single stream: TTFT "
                       f"{cal['single_stream_ttft_s'] * 1e3:.0f} ms, TPOT "
                       f"{cal['single_stream_tpot_s'] * 1e3:.1f} ms; capacity "
                       f"{cal['capacity_req_s']:.2f} req/s; SLOs "
                       + ", ".join(f"S={r.scale}: TTFT {r.ttft_ms:.0f} / TPOT {r.tpot_ms:.0f} ms"
                                   for r in rules))
            if cal.get("single_stream_ttft_by_prompt"):
                tqdm.write(f"[{regime} {label}] single-stream TTFT by prompt length "
                           f"({args.ttft_rule} rule): " + ", ".join(
                               f"{p:.0f} tok {v * 1e3:.0f} ms" for p, v in
                               sr.monotone_curve(cal["single_stream_ttft_by_prompt"])))
            tqdm.write(f"[{regime} {label}] this workload's runs: about "
                       f"{cell_estimate(args, regime, spec, cal['capacity_req_s']) / 60:.0f} min")
            sweep.capacity[(regime, spec.name)] = cal["capacity_req_s"]
            checkpoint(args, report)
            if args.calibrate_only:
                continue
            rates = [rate or frac * cal["capacity_req_s"] for _, frac, rate in args.load_levels]
            ctx = (url, switcher, model, spec, arrival, label, wi, max_model_len, synthetic,
                   rules, rates)
            for ri in args.run_levels:
                for rep in range(args.repetitions):
                    _run_point(sweep, regime, ctx, ri, rep, report, bar)
            extra = max(0, args.deciding_repetitions - args.repetitions)
            if extra and args.deciding_rates:
                decide = _deciding(report, regime, label, rules[0], rates, args)
                bar.total += extra * len(decide) * len(args.policies)
                bar.refresh()
                report.setdefault("deciding_rates", []).append(
                    {"regime": regime, "workload": label, "rates_req_s": decide})
                for rate in decide:
                    for rep in range(args.repetitions, args.deciding_repetitions):
                        _run_point(sweep, regime, ctx, rates.index(rate), rep, report, bar)
    finally:
        if stop is not None:
            stop()


def _deciding(report, regime, label, rule, rates, args) -> list[float]:
    att: dict[str, dict[float, float]] = {}
    for r in report["runs"]:
        if r["regime"] == regime and r["workload"] == label and r["slo_scale"] == rule.scale:
            flags = sr.met(report["samples"][r["run_id"]], rule)
            att.setdefault(r["policy"], {})[r["rate_req_s"]] = float(flags.mean())
    run = [rates[i] for i in args.run_levels]
    return [r for r in agg.deciding_rates(att, args.attainment_target, args.deciding_rates)
            if r in run]


def _run_point(sweep: Sweep, regime: str, ctx, ri: int, rep: int, report: dict, bar) -> None:
    from tqdm import tqdm

    (url, switcher, model, spec, arrival, label, wi, max_model_len, synthetic, rules,
     rates) = ctx
    args = sweep.args
    rate = rates[ri]
    n = wl.request_count(rate, args.duration, args.min_requests, args.max_requests)
    reqs = sweep.requests(spec, arrival, rate, n, seed_for(args.seed, label, ri, rep),
                          max_model_len)
    prompts = sweep.prompts.prompts([r.input_tokens for r in reqs],
                                    offset=100_000 + (wi * 10_000 + ri * 100 + rep) * 1000)
    order = list(args.policies)
    np.random.default_rng(seed_for(args.seed, "order", label, ri, rep)).shuffle(order)
    offered = tr.mean_rate(reqs) if len(reqs) > 1 else 0.0
    for pos, policy in enumerate(order):
        where = f"{regime} {label} {rate:.2f}/s rep {rep} {policy}"
        run_id = f"{regime}/{label}/{args.drafter}/{ri}/{rep}/{policy}"
        if run_id in report["samples"]:     # measured before this sweep was resumed
            bar.update(1)
            continue
        bar.set_description(where)
        try:
            res, before, after = sweep.run_one(url, switcher, model, policy, reqs, prompts,
                                               desc="  requests")
        except Exception as exc:   # noqa: BLE001 - one failed run must not lose the sweep
            report["errors"].append({"regime": regime, "workload": label, "rate_req_s": rate,
                                     "repetition": rep, "policy": policy,
                                     "error": f"{type(exc).__name__}: {exc}"})
            tqdm.write(f"[{where}] FAILED {exc}")
            continue
        finally:
            bar.update(1)
        records, duration = res["records"], res["duration"]
        report["samples"][run_id] = outcomes(records)
        server = server_delta(before, after)
        tpots = [r.tpot for r in records if r.ok and r.tpot is not None]
        for rule in rules:
            metrics = run_metrics(records, duration, rule)
            entry = run_entry(regime, policy, args.load_levels[ri][0], args.load_levels[ri][1],
                              offered, arrival, synthetic, metrics, server, tpots,
                              workload=label, drafter=args.drafter, repetition=rep,
                              slo_scale=rule.scale, rate_req_s=rate, run_id=run_id)
            entry.update({"rate_index": ri, "order_position": pos, "client": res["client"]})
            report["runs"].append(entry)
        m = run_metrics(records, duration, rules[0])
        checkpoint(args, report)
        tqdm.write(f"[{where}] attainment(S={rules[0].scale}) {m['slo_attainment']:.2f}, "
                   f"{m['output_tok_s']:.1f} tok/s, TTFT p50 {_ms(m['ttft_p50_s'])}, TPOT p50 "
                   f"{_ms(m['tpot_p50_s'])}, mean k {_f(server.get('mean_chosen_k'))}, prefill-capped "
                   f"steps {server.get('prefill_capped_steps', '-')}, failed "
                   f"{m['failed']}, client CPU {res['client']['cpu_share_of_one_core']}")


def _ms(v):
    return "-" if v is None else f"{v * 1000:.0f} ms"


def _f(v):
    return "-" if v is None else f"{v:.2f}"
