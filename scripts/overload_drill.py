"""Overload drill on a real local Serve app with the shipped defaults (issue: 5x capacity).

    python scripts/overload_drill.py --json overload.json

1. At capacity: `max_num_seqs` closed-loop streaming clients for --capacity-s seconds
   (greedy, --max-tokens each): completed requests/s, output tokens/s, TPOT per request.
2. Overload: Poisson arrivals at --factor x the measured request rate for --overload-s
   seconds: every refusal's status and Retry-After header, admitted requests' TPOT,
   output tokens/s over the window.
3. Recovery: sequential requests afterwards must all succeed.
The client runs at nice 19 (the server's workers run at nice 0, as `make serve` does).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

PROMPTS = ["def parse_header(line):\n    ", "import os\nimport sys\n\n\nclass ",
           "    for key, value in items:\n        if ", "def main(argv=None):\n    "]


async def _one(client, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "specserve-tiny", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    start = time.monotonic()
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                    "start": start}
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if '"error"' in line:
                    return {"status": "stream_error", "start": start}
                stamps.append(time.monotonic())
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return {"status": 200, "start": start, "end": stamps[-1] if stamps else time.monotonic(),
            "ttft": stamps[0] - start if stamps else None, "tpot": tpot, "tokens": max_tokens}


async def _capacity(url, seqs, seconds, max_tokens):
    import httpx

    results, stop = [], time.monotonic() + seconds

    async def worker(i):
        async with httpx.AsyncClient(timeout=300) as client:
            while time.monotonic() < stop:
                results.append(await _one(client, url, PROMPTS[i % 4], max_tokens))

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(seqs)))
    return results, time.monotonic() - t0


async def _overload(url, rate, seconds, max_tokens, seed=0):
    import httpx

    rng = random.Random(seed)
    tasks, t0 = [], time.monotonic()
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        next_at = t0
        i = 0
        while next_at < t0 + seconds:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            tasks.append(asyncio.create_task(_one(client, url, PROMPTS[i % 4], max_tokens)))
            i += 1
            next_at += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
    return results, t0


def _p50(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factor", type=float, default=5.0)
    ap.add_argument("--capacity-s", type=float, default=40.0)
    ap.add_argument("--overload-s", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from deployments.app import build_app
    from specserve_ray.config import AppConfig

    cfg = AppConfig()
    seqs = cfg.engine.limits.max_num_seqs
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app({}), name="specserve", route_prefix="/")
    url = "http://127.0.0.1:8000"
    os.nice(19)
    try:
        asyncio.run(_capacity(url, seqs, 8, args.max_tokens))        # warm-up
        cap, cap_s = asyncio.run(_capacity(url, seqs, args.capacity_s, args.max_tokens))
        ok = [r for r in cap if r["status"] == 200]
        cap_rate = len(ok) / cap_s
        cap_tok_s = sum(r["tokens"] for r in ok) / cap_s
        over, t0 = asyncio.run(_overload(url, args.factor * cap_rate, args.overload_s,
                                         args.max_tokens))
        done = [r for r in over if r["status"] == 200]
        refused = [r for r in over if r["status"] != 200]
        window_end = t0 + args.overload_s
        in_window = [r for r in done if r["end"] <= window_end]
        over_tok_s = sum(r["tokens"] for r in in_window) / args.overload_s
        recovery = asyncio.run(_capacity(url, 1, 5, 16))[0]
        report = {
            "config": {"max_num_seqs": seqs, "max_queued_requests": cfg.max_queued_requests,
                       "max_tokens": args.max_tokens, "factor": args.factor},
            "capacity": {"requests": len(ok), "req_s": round(cap_rate, 3),
                         "tok_s": round(cap_tok_s, 1), "tpot_p50_ms": round(1e3 * _p50([r["tpot"] for r in ok]), 1)},
            "overload": {"offered_req_s": round(args.factor * cap_rate, 3), "sent": len(over),
                         "completed": len(done), "refused": len(refused),
                         "refusal_statuses": sorted({str(r["status"]) for r in refused}),
                         "refusals_with_retry_after": sum(1 for r in refused if r.get("retry_after")),
                         "tok_s_in_window": round(over_tok_s, 1),
                         "tpot_p50_ms": round(1e3 * _p50([r["tpot"] for r in done]), 1)},
            "recovery": {"requests": len(recovery),
                         "all_ok": all(r["status"] == 200 for r in recovery)},
        }
        report["ratios"] = {
            "throughput_vs_capacity": round(over_tok_s / cap_tok_s, 3),
            "tpot_p50_vs_capacity": round(report["overload"]["tpot_p50_ms"] / report["capacity"]["tpot_p50_ms"], 3)}
        text = json.dumps(report, indent=2)
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
