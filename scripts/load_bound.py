"""Usage: PYTHONPATH=.:kernels python scripts/load_bound.py --load bench_load.json [more.json ...]
          [--calibration specserve_ray/bench/results/sweep_fp32_code_ngram_pp.json] [--json OUT]
       (or --capacity 2.48 --fractions 0.3,0.5,0.7 instead of --load)

How low can `bench load`'s TTFT ratios go on this hardware at a given load? An ideal
queue, no server: what queueing alone does to TTFT, to tell a scheduler that could do
better from a goal no scheduler can meet.

The mix is the load bench's (`code-long`: the code trace's lengths, prompts scaled to a
640-token median, Poisson arrivals, the same request generator). Each request's service
comes from a sweep's single-stream TTFT curve (`calibration.<regime>.*.
single_stream_ttft_by_prompt`: one request at a time, measured on this hardware), scaled
so that its single-stream TTFT p50 over the bench's four length-spread requests
(load.py `length_spread`) equals the one the bench measured (`--load`; the bench runs the
app's default policy, the curve plain decoding). A request holds the server for its
single-stream TTFT less the shortest prompt's (that part is HTTP, tokenizing and hops,
which overlap other requests' steps), waits for the requests ahead of it, and gets its
first token after that wait plus its whole single-stream TTFT. Two servers bound the real
one:

- `prefill only`: the server does nothing but prefill and decoding costs nothing
  (optimistic: utilisation = rate x mean prefill time);
- `whole request`: every request also brings its share of decode work, so that the
  server saturates at the bench's measured closed-loop capacity (utilisation = the
  fraction).

Both run first-come-first-served (what chunked prefill in arrival order does), or with
`--shortest-first` the shortest queued prompt first (non-preemptive). Ratios are against
the single-stream TTFT p50, as `bench load` reports them; each is the median and 5-95%
range over `--runs` request sets of the bench's size.
"""
import argparse, json, os, sys

import numpy as np

from specserve_ray.bench import trace as tr
from specserve_ray.bench import workloads as wl
from specserve_ray.bench.load import length_spread
from specserve_ray.bench.queue_model import waits
from specserve_ray.bench.slo_rule import curve_at, monotone_curve

ap = argparse.ArgumentParser()
ap.add_argument("--load", nargs="*", default=[], help="bench load --json reports to set beside")
ap.add_argument("--capacity", type=float, default=2.48, help="without --load: req/s")
ap.add_argument("--fractions", default="0.3,0.5,0.7", help="without --load")
ap.add_argument("--calibration",
                default="specserve_ray/bench/results/sweep_fp32_code_ngram_pp.json")
ap.add_argument("--regime", default="fp32")
ap.add_argument("--requests", type=int, default=60, help="requests per run without --load")
ap.add_argument("--runs", type=int, default=400)
ap.add_argument("--max-model-len", type=int, default=1024)
ap.add_argument("--trace-dir", default=None)
ap.add_argument("--shortest-first", action="store_true",
                help="serve the shortest queued prompt first (non-preemptive) instead of FCFS")
ap.add_argument("--json", default=None)
args = ap.parse_args()

cells = json.load(open(args.calibration))["calibration"][args.regime]
measured = next((c for c in cells.values() if c.get("single_stream_ttft_by_prompt")), None)
if measured is None:
    sys.exit(f"{args.calibration}: no single_stream_ttft_by_prompt in its {args.regime} "
             "calibration")
CURVE = monotone_curve(measured["single_stream_ttft_by_prompt"])     # (tokens, seconds)
spec, _ = wl.parse_workload("code-long")
rows = tr.load_trace(wl.find_trace(spec.trace, args.trace_dir))
reference_mix = wl.make_requests(spec, "poisson", rows, 1.0, 64, 1, args.max_model_len)
large_mix = wl.make_requests(spec, "poisson", rows, 1.0, 5000, 3, args.max_model_len)


def alone_s(reqs, scale):
    """Single-stream TTFT of each request, seconds."""
    return scale * np.array([curve_at(CURVE, r.input_tokens) for r in reqs])


def single_p50(scale):
    return float(np.median(alone_s(length_spread(reference_mix, 4), scale)))


def bound(capacity, fraction, count, scale, seeds):
    """TTFT p50 and p99 over single p50 for both servers: lists over seeds."""
    overlap = scale * CURVE[0][1]
    held = float(np.mean(alone_s(large_mix, scale))) - overlap     # server time a request
    stretch = max(1.0, (1.0 / capacity) / held)
    rate, ref = fraction * capacity, single_p50(scale)
    out = {"prefill only": [], "whole request": []}
    for seed in seeds:
        reqs = wl.make_requests(spec, "poisson", rows, rate, count, seed, args.max_model_len)
        arrivals = np.array([r.arrival_s for r in reqs])
        alone = alone_s(reqs, scale)
        for server, factor in (("prefill only", 1.0), ("whole request", stretch)):
            order = (lambda j: alone[j]) if args.shortest_first else None
            ttft = waits(arrivals, (alone - overlap) * factor, order) + alone
            out[server].append((np.percentile(ttft, 50) / ref, np.percentile(ttft, 99) / ref))
    util = {"prefill only": rate * held, "whole request": rate * held * stretch}
    return out, util


def q(values):
    return [round(float(x), 2) for x in np.percentile(values, [50, 5, 95])]


def shown(median_range):
    median, low, high = median_range
    return f"{median:.2f} [{low:.2f}, {high:.2f}]"


points = []
if args.load:
    cases = []
    for path in args.load:
        rep = json.load(open(path))
        cases.append((os.path.basename(path), rep["capacity_req_s"], rep["fraction"],
                       rep["load"]["requests"], rep["single"]["ttft_p50_s"], rep))
else:
    cases = [(f"x{f}", args.capacity, float(f), args.requests, None, None)
             for f in args.fractions.split(",")]
print("| load | capacity | server | utilisation | TTFT p50 / single | TTFT p99 / single |")
print("|---|---|---|---|---|---|")
for name, capacity, fraction, count, single_s, rep in cases:
    scale = single_s / single_p50(1.0) if single_s else 1.0
    model, util = bound(capacity, fraction, count, scale, range(args.runs))
    label = f"{fraction:.1f} ({fraction * capacity:.2f} req/s)"
    for server, runs in model.items():
        p50, p99 = q([r[0] for r in runs]), q([r[1] for r in runs])
        points.append({"case": name, "capacity_req_s": capacity, "fraction": fraction,
                       "server": server, "utilisation": util[server], "curve_scale": scale,
                       "ttft_p50_ratio": p50, "ttft_p99_ratio": p99})
        print(f"| {label} | {capacity:.2f} | ideal, {server} | {util[server]:.2f} | "
              f"{shown(p50)} | {shown(p99)} |")
    if rep is not None:
        r = rep["ratios"]
        points.append({"case": name, "server": "measured",
                       "ttft_p50_ratio": r["ttft_p50_vs_single"],
                       "ttft_p99_ratio": r["ttft_p99_vs_single"]})
        print(f"| {label} | {capacity:.2f} | **measured** (`bench load`) | | "
              f"**{r['ttft_p50_vs_single']:.2f}** | **{r['ttft_p99_vs_single']:.2f}** |")
if args.json:
    json.dump({"calibration": os.path.basename(args.calibration), "runs": args.runs,
               "order": "shortest first" if args.shortest_first else "fcfs",
               "points": points}, open(args.json, "w"), indent=1)
