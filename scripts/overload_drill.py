"""Overload drill on a real local Serve app with the shipped defaults (issue: 5x capacity).

    python scripts/overload_drill.py --reps 3 --json overload.json

One Serve app, a warm-up, then --reps rounds, each:
1. At capacity: `max_num_seqs` closed-loop streaming clients for --capacity-s seconds
   (greedy, --max-tokens each).
2. Overload: Poisson arrivals at --factor x the request rate measured in round 1's
   capacity phase, for --overload-s seconds: every refusal's status and Retry-After,
   admitted requests' TPOT.
Afterwards sequential requests must all succeed (recovery).

Both phases are measured the same way: output tokens/s counted inside the phase's own
window (a request's tokens are spread over its SSE events, so requests still running
at the window's end count for the part they emitted inside it), TPOT per request =
(last event - first event) / (tokens - 1). The client runs at nice 19 (the server's
processes at nice 0, as `make serve`); the CPU seconds of the client and of every
process of the local Ray instance (the driver's descendants: proxy, replica, workers,
Ray's own daemons) are reported per phase, so a starved client or a busy proxy shows.
`--profile DIR` runs py-spy (raw collapsed stacks) on the proxy and the router replica
during the first overload phase. `--args JSON` overrides app args (A/B of configs);
`--serve-queue N` sets Serve's own max_queued_requests with a 429 + Retry-After
backpressure answer. Prints one JSON object: per round and median/min/max ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import subprocess
import sys
import time

PROMPTS = ["def parse_header(line):\n    ", "import os\nimport sys\n\n\nclass ",
           "    for key, value in items:\n        if ", "def main(argv=None):\n    "]
TICKS = os.sysconf("SC_CLK_TCK")


# -- CPU accounting of the local Ray instance ------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _label(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    for key, label in (("ProxyActor", "proxy"), ("ServeReplica", "router_replica"),
                       ("ServeController", "serve_controller"), ("TargetActor", "target"),
                       ("DraftActor", "draft"), ("raylet", "raylet"), ("gcs_server", "gcs"),
                       ("dashboard", "dashboard"), ("log_monitor", "log_monitor")):
        if key in cmd:
            return label
    return "ray_other"


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS     # utime + stime
    except OSError:
        return 0.0


def ray_processes() -> dict[int, str]:
    """Every descendant of this driver (the Ray instance it started), labelled."""
    kids, out, todo = _children(), {}, [os.getpid()]
    while todo:
        for child in kids.get(todo.pop(), []):
            out[child] = _label(child)
            todo.append(child)
    return out


def cpu_snapshot() -> dict[str, float]:
    t = os.times()
    snap = {"client": t.user + t.system}
    for pid, label in ray_processes().items():
        snap[label] = snap.get(label, 0.0) + _cpu_s(pid)
    return snap


def cpu_delta(before: dict, after: dict, seconds: float) -> dict:
    """Cores used per process group over the phase (CPU seconds / wall seconds)."""
    return {k: round((after[k] - before.get(k, 0.0)) / seconds, 3)
            for k in sorted(after) if after[k] - before.get(k, 0.0) > 0.01 * seconds}


# -- one streaming request --------------------------------------------------------------------
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
    tpot = (stamps[-1] - stamps[0]) / (max_tokens - 1) if len(stamps) > 1 else None
    return {"status": 200, "start": start, "stamps": stamps, "tpot": tpot,
            "tokens": max_tokens}


def tokens_between(results, t0: float, t1: float) -> float:
    """Output tokens emitted in [t0, t1): each request's tokens spread over its events."""
    total = 0.0
    for r in results:
        stamps = r.get("stamps") or []
        if stamps:
            inside = sum(1 for s in stamps if t0 <= s < t1)
            total += r["tokens"] * inside / len(stamps)
    return total


async def _capacity(url, seqs, seconds, max_tokens):
    import httpx

    results, t0 = [], time.monotonic()
    stop = t0 + seconds

    async def worker(i):
        async with httpx.AsyncClient(timeout=300) as client:
            while time.monotonic() < stop:
                results.append(await _one(client, url, PROMPTS[i % 4], max_tokens))

    await asyncio.gather(*(worker(i) for i in range(seqs)))
    return results, t0


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


def _spread(xs) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3),
            "max": round(max(xs), 3), "runs": [round(x, 3) for x in xs]}


def server_steps(handle) -> dict:
    return handle.stats.remote().result(timeout_s=60)["step_time_s"]


def steps_delta(before: dict, after: dict) -> dict:
    """The server's own view of a phase: steps, rows per step, mean ms per step and per
    part (draft, verify, prefill, router overhead), free of any client-side lag."""
    n = max(after["steps"] - before["steps"], 1)
    out = {"steps": after["steps"] - before["steps"],
           "rows_per_step": round((after["rows"] - before["rows"]) / n, 2)}
    for part in ("total", "draft", "verify", "prefill", "overhead"):
        out[f"{part}_ms"] = round(1e3 * (after[part] - before[part]) / n, 2)
    return out


def _py_spy(pids: dict[int, str], seconds: float, out_dir: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    procs = []
    for pid, label in pids.items():
        if label in ("proxy", "router_replica"):
            procs.append(subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-p",
                 str(pid), "-d", str(int(seconds)), "-r", "50", "--nonblocking", "-f", "raw",
                 "-o", os.path.join(out_dir, f"{label}-{pid}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factor", type=float, default=5.0)
    ap.add_argument("--capacity-s", type=float, default=30.0)
    ap.add_argument("--overload-s", type=float, default=60.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--args", default="{}", help="app args (JSON) over the defaults")
    ap.add_argument("--serve-queue", type=int, default=None,
                    help="Serve's max_queued_requests (429 + Retry-After past it)")
    ap.add_argument("--profile", default=None, help="py-spy output folder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from deployments.app import build_app
    from specserve_ray.config import AppConfig

    app_args = json.loads(args.args)
    cfg = AppConfig.model_validate(app_args)
    seqs = cfg.engine.limits.max_num_seqs
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    app = build_app(app_args)
    if args.serve_queue is not None:
        from ray.serve import Application

        app = Application(app._bound_deployment.options(
            max_queued_requests=args.serve_queue,
            backpressure_config={"status_code": 429, "retry_after_s": 5}))
    handle = serve.run(app, name="specserve", route_prefix="/")
    url = "http://127.0.0.1:8000"
    os.nice(19)
    rounds = []
    try:
        asyncio.run(_capacity(url, seqs, 8, args.max_tokens))        # warm-up
        rate = None
        for rep in range(args.reps):
            s0, c0 = server_steps(handle), cpu_snapshot()
            cap, t0 = asyncio.run(_capacity(url, seqs, args.capacity_s, args.max_tokens))
            c1, s1 = cpu_snapshot(), server_steps(handle)
            cap_wall = time.monotonic() - t0
            ok = [r for r in cap if r["status"] == 200]
            cap_tok_s = tokens_between(ok, t0, t0 + args.capacity_s) / args.capacity_s
            if rate is None:
                rate = args.factor * sum(1 for r in ok if r["stamps"][-1] < t0 + args.capacity_s) / args.capacity_s
            spies = (_py_spy(ray_processes(), args.overload_s, args.profile)
                     if args.profile and rep == 0 else [])
            s2, c2 = server_steps(handle), cpu_snapshot()
            over, t1 = asyncio.run(_overload(url, rate, args.overload_s, args.max_tokens,
                                             seed=rep))
            c3, s3 = cpu_snapshot(), server_steps(handle)
            over_wall = time.monotonic() - t1
            for p in spies:
                p.wait()
            done = [r for r in over if r["status"] == 200]
            refused = [r for r in over if r["status"] != 200]
            over_tok_s = tokens_between(done, t1, t1 + args.overload_s) / args.overload_s
            cap_tpot, over_tpot = _p50([r["tpot"] for r in ok]), _p50([r["tpot"] for r in done])
            rounds.append({
                "capacity": {"completed": len(ok), "tok_s": round(cap_tok_s, 1),
                             "tpot_p50_ms": round(1e3 * cap_tpot, 2),
                             "cores": cpu_delta(c0, c1, cap_wall),
                             "server_steps": steps_delta(s0, s1)},
                "overload": {"offered_req_s": round(rate, 2), "sent": len(over),
                             "completed": len(done), "refused": len(refused),
                             "refusal_statuses": sorted({str(r["status"]) for r in refused}),
                             "refusals_with_retry_after": sum(1 for r in refused
                                                              if r.get("retry_after")),
                             "retry_after_s": dict(collections.Counter(
                                 r.get("retry_after") for r in refused).most_common(5)),
                             "tok_s": round(over_tok_s, 1),
                             "tpot_p50_ms": round(1e3 * over_tpot, 2),
                             "cores": cpu_delta(c2, c3, over_wall),
                             "server_steps": steps_delta(s2, s3)},
                "throughput_ratio": round(over_tok_s / cap_tok_s, 3),
                "tpot_ratio": round(over_tpot / cap_tpot, 3)})
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
        recovery = asyncio.run(_capacity(url, 1, 5, 16))[0]
        report = {
            "command": " ".join(sys.argv),
            "config": {"max_num_seqs": seqs, "max_queued_requests": cfg.max_queued_requests,
                       "max_tokens": args.max_tokens, "factor": args.factor,
                       "serve_queue": args.serve_queue, "args": app_args},
            "rounds": rounds,
            "throughput_ratio": _spread([r["throughput_ratio"] for r in rounds]),
            "tpot_ratio": _spread([r["tpot_ratio"] for r in rounds]),
            "every_refusal_429_503_with_retry_after": all(
                r["overload"]["refusals_with_retry_after"] == r["overload"]["refused"]
                and set(r["overload"]["refusal_statuses"]) <= {"429", "503"} for r in rounds),
            "recovery": {"requests": len(recovery),
                         "all_ok": all(r["status"] == 200 for r in recovery)},
        }
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
