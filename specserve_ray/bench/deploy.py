"""`bench deploy`: the Ray Serve deployment against the in-process engine, same prompts.

Measures output tokens/s at 1 and 8 concurrent streams over streaming HTTP (the OpenAI
API), the same workload on the in-process engine, and the router's step time split into
draft forward, target verify, prefill and the rest (router + transport + Ray), read from
the router's own counters (`GET /v1/stats`) before and after each run.

Fairness on a shared 2-core machine (../shared/ENVIRONMENT.md): Ray runs the Serve proxy,
the replica and the draft/target actors at its worker niceness (Ray's default is 15; the
Makefile and the app this benchmark starts set RAY_worker_niceness=0: they are the server). So the HTTP client runs in
its own process at nice 19 (client.py, its CPU use reported), and the in-process engine
runs in its own process at `--engine-nice` (default: the workers' level; pass e.g.
`--engine-nice 15 0` to report both). The report says how each side ran.
"""
from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ProcessPoolExecutor



async def _stream_one(client, url: str, prompt: str, max_tokens: int) -> int:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens


def step_split(before: dict, after: dict) -> dict:
    """Per-run step-time split from two /v1/stats snapshots (pure). Every key the router's
    `step_time_s` exposes is diffed, so planning/applying timers show up when it has them."""
    b, a = before.get("step_time_s", {}), after.get("step_time_s", {})
    split = {k: a[k] - b.get(k, 0) for k in a if isinstance(a[k], (int, float))}
    total, steps = split.get("total", 0), split.get("steps", 0)
    out = {"step_split_s": split,
           "overhead_share": round(split["overhead"] / total, 4)
           if total and "overhead" in split else None,
           "mean_batch": round(split["rows"] / steps, 2) if steps and "rows" in split else None,
           # Per step as a request sees it; with pipelining two steps overlap in time.
           "mean_step_ms": round(1e3 * total / steps, 2) if steps else None}
    cycle = split.get("cycle")
    if cycle:
        # Router + transport against the whole step cycle (planning and applying included).
        parts = [k for k in ("plan", "apply", "loop_wait", "transport") if k in split]
        out["router_parts_share"] = {k: round(split[k] / cycle, 4) for k in parts}
        out["router_transport_share"] = round(sum(split[k] for k in parts) / cycle, 4)
        out["mean_cycle_ms"] = round(1e3 * cycle / steps, 2) if steps else None
        out["per_step_ms"] = {k: round(1e3 * v / steps, 3) for k, v in split.items()
                              if k not in ("steps", "rows")} if steps else {}
    return out


async def http_run(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        before = (await client.get(url + "/v1/stats", timeout=60)).json()
        queue = list(prompts)
        start = time.perf_counter()

        async def worker():
            done = 0
            while queue:
                done += await _stream_one(client, url, queue.pop(), max_tokens)
            return done

        tokens = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
        seconds = time.perf_counter() - start
        after = (await client.get(url + "/v1/stats", timeout=60)).json()
    return {"tok_s": round(tokens / seconds, 2), "tokens": tokens, "seconds": round(seconds, 2),
            **step_split(before, after)}


def _http_in_child(url, prompts, concurrency, max_tokens) -> dict:
    from specserve_ray.bench.client import _cpu_seconds, _niceness

    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    out = asyncio.run(http_run(url, prompts, concurrency, max_tokens))
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    out["client"] = {"nice": _niceness(), "cpu_share_of_one_core": round(cpu / wall, 4)}
    return out


_ENGINE = None     # the engine of this child process (built once, reused by every repeat)


def _engine_in_child(k: int, threads: int, prompt_ids, c: int, max_tokens: int) -> dict:
    """Runs in a process at the engine's niceness: one timed run at `c` streams (the
    engine is built on the first call and kept, as the deployment is between repeats)."""
    global _ENGINE
    import torch

    from specserve_ray.bench.client import _niceness
    from specserve_ray.config import EngineConfig, SpeculationConfig
    from specserve_ray.sampling_params import SamplingParams
    from specserve_ray.engine import SpecEngine

    if _ENGINE is None:
        torch.set_num_threads(threads)
        _ENGINE = SpecEngine.from_config(EngineConfig())   # fp32 pair, like the app's target
        _ENGINE.speculation = SpeculationConfig(num_speculative_tokens=k)
    engine = _ENGINE
    engine.limits = engine.limits.model_copy(update={"max_num_seqs": c})
    engine.generate(prompt_ids[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    before = {"step_time_s": engine.step_totals.summary()}
    start = time.perf_counter()
    outs = engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    seconds = time.perf_counter() - start
    tokens = sum(len(o.output_ids) for o in outs)
    return {"tok_s": round(tokens / seconds, 2), "tokens": tokens, "seconds": round(seconds, 2),
            "nice": _niceness(), "threads": torch.get_num_threads(),
            **step_split(before, {"step_time_s": engine.step_totals.summary()})}


def spread(values: list[float]) -> dict:
    """Median and range of repeated measurements (pure)."""
    v = sorted(values)
    n = len(v)
    median = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return {"median": round(median, 4), "min": round(v[0], 4), "max": round(v[-1], 4),
            "n": n, "values": [round(x, 4) for x in values]}


def _worker_threads() -> dict:
    """The worker actors' torch intra-op threads as the shipped config sets them."""
    from specserve_ray.bench.control import app_from_config

    engine = app_from_config()[1].get("engine", {})
    return {role: (engine.get(role) or {}).get("num_threads") for role in ("draft", "target")}


def _child(nice: int) -> ProcessPoolExecutor:
    import multiprocessing as mp

    from specserve_ray.bench.client import _init

    return ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_init,
                               initargs=(nice,))


def _set_pipeline(on: bool) -> None:
    from ray import serve

    serve.get_app_handle("specserve").reconfigure.remote({"pipeline": on}).result()


def run(args) -> dict:
    from specserve_ray.bench.client import server_worker_nice
    from specserve_ray.bench.control import start_app
    from specserve_ray.bench.workload import load_tokenizer

    args.engine_nice = args.engine_nice or [server_worker_nice()]
    from specserve_ray.prompts import held_out_prompts

    tokenizer = load_tokenizer()
    prompt_ids = held_out_prompts(tokenizer, args.requests, args.prompt_tokens)
    prompts = [tokenizer.decode(p) for p in prompt_ids]
    # Re-encode so both sides see exactly the same token ids.
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    transports = ["external"] if args.url else args.transport
    report: dict = {"setup": {"requests": len(prompts), "prompt_tokens": args.prompt_tokens,
                              "new_tokens": args.new_tokens, "k": args.k,
                              "transports": transports,
                              "how_each_side_ran": {
                                  "deployment": f"Ray workers (proxy, replica, draft and target "
                                  f"actors) at nice {server_worker_nice()} "
                                  "(RAY_worker_niceness; the project's default 0)"
                                  if not args.url else "external: as deployed",
                                  "deployment_torch_threads": {
                                      **_worker_threads(),
                                      **({"draft": args.draft_threads}
                                         if args.draft_threads is not None else {})},
                                  "http_client": "own process at nice 19",
                                  "in_process_engine": f"own process at nice "
                                  f"{args.engine_nice}, no client beside it, "
                                  f"{args.threads} torch threads"}},
                    "by_transport": {}}
    repeats = max(1, args.repeats)
    report["setup"]["repeats"] = repeats
    report["setup"]["order"] = ("per repeat and concurrency: the deployment, then the "
                                "in-process engine(s); every other repeat engine first")
    engines = {nice: _child(nice) for nice in args.engine_nice}
    samples: dict = {}          # (transport, pipeline, c) -> list of deployment runs
    eng_samples: dict = {}      # (nice, c) -> list of engine runs
    ratios: dict = {}           # (transport, pipeline, c, nice) -> paired ratios
    try:
        with _child(19) as client:
            for i, transport in enumerate(transports):
                overrides = {"speculation": {"num_speculative_tokens": args.k}}
                if args.draft_threads is not None:
                    overrides["draft"] = {"num_threads": args.draft_threads}
                url, stop = (args.url, None) if args.url else start_app(overrides,
                                                                        transport=transport)
                pipelines = args.pipeline if not args.url else ["as-deployed"]
                try:
                    for rep in range(repeats):
                        for c in args.streams:
                            def engine_runs():
                                return {nice: pool.submit(
                                    _engine_in_child, args.k, args.threads, prompt_ids, c,
                                    args.new_tokens).result() for nice, pool in engines.items()}

                            eng = engine_runs() if rep % 2 else None
                            runs = {}
                            for pipeline in pipelines:
                                if pipeline != "as-deployed":
                                    _set_pipeline(pipeline == "on")
                                # Warm the deployment up at this concurrency first.
                                client.submit(_http_in_child, url, prompts[:c], c, 8).result()
                                d = client.submit(_http_in_child, url, prompts, c,
                                                  args.new_tokens).result()
                                d["pipeline"] = pipeline
                                runs[pipeline] = d
                            if eng is None:
                                eng = engine_runs()
                            for pipeline, d in runs.items():
                                samples.setdefault((transport, pipeline, c), []).append(d)
                                for nice, e in eng.items():
                                    ratios.setdefault((transport, pipeline, c, nice), []).append(
                                        d["tok_s"] / e["tok_s"])
                                print(f"[{rep + 1}/{repeats}] deployment ({transport}, "
                                      f"pipeline {pipeline}) {c} streams: {d['tok_s']:8.2f} "
                                      f"tok/s  cycle {d.get('mean_cycle_ms')} ms  router+"
                                      f"transport {d.get('router_transport_share')}", flush=True)
                            if i == 0:
                                for nice, e in eng.items():
                                    eng_samples.setdefault((nice, c), []).append(e)
                                    print(f"[{rep + 1}/{repeats}] in-process (nice {e['nice']}) "
                                          f"{c} streams: {e['tok_s']:8.2f} tok/s  cycle "
                                          f"{e.get('mean_cycle_ms')} ms", flush=True)
                finally:
                    if stop:
                        stop()
    finally:
        for pool in engines.values():
            pool.shutdown()
    _summarize(report, args, transports, samples, eng_samples, ratios)
    return report


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tok/s (its step split comes with it)."""
    return sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]


def _summarize(report, args, transports, samples, eng_samples, ratios) -> None:
    """Headline keys (medians; kept from the single-run report) and spreads."""
    headline = args.engine_nice[0]
    for (transport, pipeline, c), runs in samples.items():
        key = c if pipeline in ("off", "as-deployed") else f"{c}_pipelined"
        d = {**_median_run(runs), "tok_s_spread": spread([r["tok_s"] for r in runs])}
        shares = [r["router_transport_share"] for r in runs if r.get("router_transport_share")]
        if shares:
            d["router_transport_share_spread"] = spread(shares)
        report["by_transport"].setdefault(transport, {})[key] = d
        if transport == transports[0] and pipeline in ("off", "as-deployed"):
            report[f"deploy_{c}"] = d
            report[f"deploy_tok_s_{c}"] = d["tok_s_spread"]["median"]
            report[f"overhead_share_{c}"] = d["overhead_share"]
            report[f"router_transport_share_{c}"] = d.get("router_transport_share")
    for (nice, c), runs in eng_samples.items():
        suffix = "" if nice == headline else f"_nice{nice}"
        e = {**_median_run(runs), "tok_s_spread": spread([r["tok_s"] for r in runs])}
        report[f"engine_{c}{suffix}"] = e
        report[f"engine_tok_s_{c}{suffix}"] = e["tok_s_spread"]["median"]
    for (transport, pipeline, c, nice), values in ratios.items():
        suffix = "" if nice == headline else f"_nice{nice}"
        name = f"{c}" if pipeline in ("off", "as-deployed") else f"{c}_pipelined"
        sp = spread(values)
        report["by_transport"][transport].setdefault("vs_engine", {})[f"{name}{suffix}"] = sp
        if transport == transports[0] and pipeline in ("off", "as-deployed"):
            report[f"deploy_vs_engine_{c}{suffix}"] = round(sp["median"], 3)
            report[f"deploy_vs_engine_{c}{suffix}_spread"] = sp
            print(f"deployment / in-process at {c} streams (nice {nice}): median "
                  f"{sp['median']:.3f}x, range {sp['min']:.3f}-{sp['max']:.3f}x over "
                  f"{sp['n']} paired repeats", flush=True)


def add_parser(sub):
    p = sub.add_parser("deploy", help="Ray Serve deployment vs in-process engine, step split")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--url", help="a running deployment (default: start the default app)")
    p.add_argument("--transport", nargs="+", default=["actor", "compiled_graph"],
                   choices=["compiled_graph", "actor"],
                   help="start the app with each transport in turn (first = headline)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    p.add_argument("--pipeline", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="run each transport with draft/verify pipelining off and/or on "
                        "(switched live through reconfigure; ignored with --url)")
    p.add_argument("--engine-nice", type=int, nargs="+", default=None,
                   help="niceness of the in-process engine's process (default: the Ray "
                   "workers' level, RAY_worker_niceness, 0 unless set; the first is the "
                   "headline, others are reported beside it)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of the in-process engine")
    p.add_argument("--draft-threads", type=int, help="torch threads of the started app's "
                   "draft actor (default: the shipped config's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repeats (deployment and in-process engine side by side, "
                   "alternating which goes first); medians and ranges are reported")
    p.set_defaults(func=run)
