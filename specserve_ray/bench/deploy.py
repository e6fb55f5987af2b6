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


def _engine_in_child(k: int, threads: int, prompt_ids, streams, max_tokens) -> dict:
    """Runs in a process at the engine's niceness: build the engine, time each concurrency."""
    import torch

    from specserve_ray.bench.client import _niceness
    from specserve_ray.config import EngineConfig, SamplingParams, SpeculationConfig
    from specserve_ray.engine import SpecEngine

    torch.set_num_threads(threads)
    engine = SpecEngine.from_config(EngineConfig())   # fp32 pair, like the app's target
    engine.speculation = SpeculationConfig(num_speculative_tokens=k)
    out = {"nice": _niceness(), "threads": threads}
    for c in streams:
        engine.limits = engine.limits.model_copy(update={"max_num_seqs": c})
        engine.generate(prompt_ids[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        outs = engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        seconds = time.perf_counter() - start
        tokens = sum(len(o.output_ids) for o in outs)
        out[c] = {"tok_s": round(tokens / seconds, 2), "tokens": tokens,
                  "seconds": round(seconds, 2)}
    return out


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
                                  "http_client": "own process at nice 19",
                                  "in_process_engine": f"own process at nice "
                                  f"{args.engine_nice}, no client beside it, "
                                  f"{args.threads} torch threads"}},
                    "by_transport": {}}
    with _child(19) as client:
        for i, transport in enumerate(transports):
            url, stop = (args.url, None) if args.url else start_app(
                {"speculation": {"num_speculative_tokens": args.k}}, transport=transport)
            runs = report["by_transport"][transport] = {}
            try:
                for pipeline in (args.pipeline if not args.url else ["as-deployed"]):
                    if pipeline != "as-deployed":
                        _set_pipeline(pipeline == "on")
                    for c in args.streams:
                        # Warm the deployment up once per concurrency level.
                        client.submit(_http_in_child, url, prompts[:c], c, 8).result()
                        d = client.submit(_http_in_child, url, prompts, c,
                                          args.new_tokens).result()
                        d["pipeline"] = pipeline
                        runs[c if pipeline in ("off", "as-deployed") else f"{c}_pipelined"] = d
                        if i == 0 and pipeline in ("off", "as-deployed"):
                            # The headline keys describe the first (default) transport.
                            report[f"deploy_{c}"] = d
                            report[f"deploy_tok_s_{c}"] = d["tok_s"]
                            report[f"overhead_share_{c}"] = d["overhead_share"]
                        print(f"deployment ({transport}, pipeline {pipeline}) {c} streams: "
                              f"{d['tok_s']:8.2f} tok/s  mean step {d['mean_step_ms']} ms  "
                              f"mean batch {d['mean_batch']}  router/transport share "
                              f"{d['overhead_share']}", flush=True)
            finally:
                if stop:
                    stop()
    for nice in args.engine_nice:
        with _child(nice) as pool:
            e = pool.submit(_engine_in_child, args.k, args.threads, prompt_ids, args.streams,
                            args.new_tokens).result()
        suffix = "" if nice == args.engine_nice[0] else f"_nice{nice}"
        for c in args.streams:
            report[f"engine_{c}{suffix}"] = {**e[c], "nice": e["nice"]}
            report[f"engine_tok_s_{c}{suffix}"] = e[c]["tok_s"]
            print(f"in-process (nice {e['nice']}) {c} streams: {e[c]['tok_s']:8.2f} tok/s",
                  flush=True)
            if f"deploy_tok_s_{c}" in report:
                report[f"deploy_vs_engine_{c}{suffix}"] = round(
                    report[f"deploy_tok_s_{c}"] / e[c]["tok_s"], 3)
    return report


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
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run)
