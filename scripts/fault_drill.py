"""Fault drill on a real local Serve app: kill -9 the workers under load, and a soak.

    python scripts/fault_drill.py --concurrency 16            # draft kill, target kill
    python scripts/fault_drill.py --soak 1000 --kills 3       # long soak with RSS

Each kill drill first runs the same greedy requests undisturbed (the reference), then
again with the worker's process SIGKILLed one second in; it reports failed requests,
outputs that differ from the reference, and how long recovery took (draft: kill ->
speculation resumed; target: kill -> /health 200 and the restarted target serving).
The soak sends requests of mixed lengths, ~20% cancelled mid-stream, kills the draft a
few times, and reports every request's end, leaked slots and RSS at start and end.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from fault_app import (PROMPTS, faults, run_batch, slots_back_to_zero,  # noqa: E402
                       start_app, stop_app, stream_and_cancel, wait_for)


def _kill_drill(handle, url: str, role: str, n: int, lengths: list[int]) -> dict:
    import httpx

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    reference = run_batch(handle, prompts, lengths, f"ref-{role}")
    before = faults(handle)
    pid = handle.worker_pids.remote().result()[role]
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(
        run_batch(handle, prompts, lengths, f"drill-{role}")))
    runner.start()
    time.sleep(1.0)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    back = None
    if role == "target":
        with httpx.Client(timeout=5) as client:
            down_seen = False
            while time.monotonic() - killed < 120:
                try:
                    code = client.get(url + "/health").status_code
                except httpx.HTTPError:
                    code = -1
                down_seen |= code != 200
                if down_seen and code == 200:
                    back = time.monotonic() - killed
                    break
                time.sleep(0.05)
    else:
        key = "draft_restarts"
        wait_for(lambda: faults(handle)[key] > before[key], 120, 0.05)
        back = time.monotonic() - killed
    runner.join()
    failed = sum(isinstance(r, Exception) for r in results)
    differ = sum(not isinstance(r, Exception) and r["token_ids"] != ref["token_ids"]
                 for r, ref in zip(results, reference))
    after = faults(handle)
    return {"role": role, "requests": n, "failed": failed, "differ_from_undisturbed": differ,
            "recovery_s": None if back is None else round(back, 2),
            "recovery_is": "speculation resumed" if role == "draft" else "/health 200 again",
            "fault_counters": {k: after[k] - before[k] for k in after
                               if isinstance(after[k], (int, float)) and not isinstance(after[k], bool)
                               and after[k] != before[k]},
            "slots_after": slots_back_to_zero(handle)}


def _rss_mb(pids: dict) -> dict:
    """Resident set size of each process, from /proc (Linux)."""
    out = {}
    for role, pid in pids.items():
        try:
            with open(f"/proc/{pid}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            out[role] = round(kb / 1024, 1)
        except (OSError, StopIteration):
            out[role] = None
    return out


def _soak(handle, total: int, kills: int, concurrency: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(11)
    run_batch(handle, PROMPTS[:4], [32] * 4, "warmup")
    start_rss = _rss_mb(handle.worker_pids.remote().result())
    kill_at = set(rng.sample(range(total // 10, total), kills)) if kills else set()
    ends = {"completed": 0, "cancelled": 0, "error": 0}

    def one(i):
        if i in kill_at:
            try:
                os.kill(handle.worker_pids.remote().result()["draft"], signal.SIGKILL)
            except (KeyError, ProcessLookupError):
                pass                              # the draft is down already
        prompt, n = PROMPTS[rng.randrange(len(PROMPTS))], rng.choice([8, 16, 32, 64, 128])
        try:
            if rng.random() < 0.2:
                stream_and_cancel(handle, prompt, 200, rng.randint(1, 5), f"soak-c-{i}")
                return "cancelled"
            handle.generate.remote(prompt, max_tokens=n, ignore_eos=True,
                                   request_id=f"soak-{i}").result(timeout_s=600)
            return "completed"
        except Exception:  # noqa: BLE001 - counted
            return "error"

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for end in pool.map(one, range(total)):
            ends[end] += 1
    wait_for(lambda: faults(handle)["draft_up"], 120)
    end_rss = _rss_mb(handle.worker_pids.remote().result())
    return {"requests": total, "ends": ends, "seconds": round(time.monotonic() - t0, 1),
            "slots_after": slots_back_to_zero(handle), "rss_mb_start": start_rss,
            "rss_mb_end": end_rss, "faults": faults(handle),
            "note": "draft RSS is of a recreated process after kills; compare router/target"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--transport", default="actor", choices=["actor", "compiled_graph"])
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--soak", type=int, default=0, help="run a soak of this many requests")
    ap.add_argument("--kills", type=int, default=3, help="draft kills during the soak")
    args = ap.parse_args()
    handle, url = start_app(args.transport, args.pipeline, max_num_seqs=16,
                            faults={"step_timeout_s": 60.0})
    try:
        out: dict = {"transport": args.transport, "pipeline": args.pipeline}
        if args.soak:
            out["soak"] = _soak(handle, args.soak, args.kills, args.concurrency)
        else:
            lengths = [args.max_tokens] * args.concurrency
            out["draft_kill"] = _kill_drill(handle, url, "draft", args.concurrency, lengths)
            out["target_kill"] = _kill_drill(handle, url, "target", args.concurrency, lengths)
        print(json.dumps(out, indent=1))
    finally:
        stop_app()


if __name__ == "__main__":
    main()
