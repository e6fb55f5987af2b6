"""`bench deploy`: the Ray Serve deployment against the in-process engine, same prompts.

Measures output tokens/s at 1 and 8 concurrent streams over streaming HTTP (the OpenAI
API), the same workload on the in-process engine, and the router's step time split into
draft forward, target verify, prefill and the rest (router + transport + Ray), read from
the router's own counters (`GET /v1/stats`) before and after each run.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import torch

from specserve_ray.config import EngineConfig, SamplingParams
from specserve_ray.prompts import held_out_prompts


DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "deployments", "default.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    split = {k: after["step_time_s"][k] - before["step_time_s"][k]
             for k in ("draft", "verify", "prefill", "total", "overhead", "steps", "rows")}
    return {"tok_s": round(tokens / seconds, 2), "tokens": tokens, "seconds": round(seconds, 2),
            "step_split_s": split,
            "overhead_share": round(split["overhead"] / split["total"], 4) if split["total"] else None,
            "mean_batch": round(split["rows"] / split["steps"], 2) if split["steps"] else None,
            # Per step as a request sees it; with pipelining two steps overlap in time.
            "mean_step_ms": round(1e3 * split["total"] / split["steps"], 2) if split["steps"] else None}


def engine_run(engine, prompt_ids: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    engine.limits = engine.limits.model_copy(update={"max_num_seqs": concurrency})
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate(prompt_ids[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = engine.generate(prompt_ids, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.output_ids) for o in outs)
    return {"tok_s": round(tokens / seconds, 2), "tokens": tokens, "seconds": round(seconds, 2)}


def start_app(transport: str, k: int, engine_overrides: dict | None = None) -> tuple[str, callable]:
    """Start Ray and the default app; `engine_overrides` ({section: {key: value}}) are
    merged into the config's engine sections (e.g. {"target": {"dtype": "bfloat16"}})."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # The default app exactly as `make serve` runs it, with this run's transport and k.
    import yaml

    with open(DEFAULT_CONFIG) as f:
        args = yaml.safe_load(f)["applications"][0]["args"]
    args["transport"] = transport
    args["engine"]["speculation"] = {"num_speculative_tokens": k}
    for section, values in (engine_overrides or {}).items():
        args["engine"][section] = {**(args["engine"].get(section) or {}), **values}
    serve.run(build_app(args), name="specserve", route_prefix="/")

    def stop():
        serve.shutdown()
        ray.shutdown()

    return f"http://127.0.0.1:{port}", stop


def _set_pipeline(on: bool) -> None:
    from ray import serve

    serve.get_app_handle("specserve").reconfigure.remote({"pipeline": on}).result()


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    engine_cfg = EngineConfig()
    from specserve_ray.engine import SpecEngine
    from specserve_ray.config import SpeculationConfig

    engine = SpecEngine.from_config(engine_cfg)   # fp32 pair, 2 threads, like the app's target
    engine.speculation = SpeculationConfig(num_speculative_tokens=args.k)
    prompt_ids = held_out_prompts(engine.tokenizer, args.requests, args.prompt_tokens)
    prompts = [engine.tokenizer.decode(p) for p in prompt_ids]
    # Re-encode so both sides see exactly the same token ids.
    prompt_ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    transports = ["external"] if args.url else args.transport
    report: dict = {"setup": {"requests": len(prompts), "prompt_tokens": args.prompt_tokens,
                              "new_tokens": args.new_tokens, "k": args.k,
                              "transports": transports}, "by_transport": {}}
    for i, transport in enumerate(transports):
        url, stop = (args.url, None) if args.url else start_app(transport, args.k)
        runs = report["by_transport"][transport] = {}
        try:
            for pipeline in (args.pipeline if not args.url else ["as-deployed"]):
                if pipeline != "as-deployed":
                    _set_pipeline(pipeline == "on")
                for c in args.streams:
                    # Warm the deployment up once per concurrency level.
                    asyncio.run(http_run(url, prompts[:c], c, 8))
                    d = asyncio.run(http_run(url, prompts, c, args.new_tokens))
                    d["pipeline"] = pipeline
                    runs[c if pipeline in ("off", "as-deployed") else f"{c}_pipelined"] = d
                    if i == 0 and pipeline in ("off", "as-deployed"):
                        # The headline keys describe the first (default) transport.
                        report[f"deploy_{c}"] = d
                        report[f"deploy_tok_s_{c}"] = d["tok_s"]
                        report[f"overhead_share_{c}"] = d["overhead_share"]
                    print(f"deployment ({transport}, pipeline {pipeline}) {c} streams: "
                          f"{d['tok_s']:8.2f} tok/s  mean step {d['mean_step_ms']} ms  mean "
                          f"batch {d['mean_batch']}  router/transport share "
                          f"{d['overhead_share']}", flush=True)
        finally:
            if stop:
                stop()
    for c in args.streams:
        e = engine_run(engine, prompt_ids, c, args.new_tokens)
        report[f"engine_{c}"] = e
        report[f"engine_tok_s_{c}"] = e["tok_s"]
        print(f"in-process  {c} streams: {e['tok_s']:8.2f} tok/s", flush=True)
        if f"deploy_tok_s_{c}" in report:
            report[f"deploy_vs_engine_{c}"] = round(report[f"deploy_tok_s_{c}"] / e["tok_s"], 3)
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
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run)
