"""Usage: PYTHONPATH=.:kernels python scripts/load_bound.py [--capacity 2.48] [--fractions 0.3,0.5,0.7]
          [--calibration specserve_ray/bench/results/sweep_fp32_code_pp.json] [--json OUT]

How low can `bench load`'s TTFT ratios go on this hardware at a given load? An ideal
queue, no server: what queueing alone does to TTFT, to tell a scheduler that could do
better from a goal no scheduler can meet.

The mix is the load bench's (`code-long`: the code trace's lengths, prompts scaled to a
640-token median, Poisson arrivals, the same request generator and seeds). Each request's
service is its single-stream TTFT at its own prompt length, from a sweep's calibration
curve (`calibration.<regime>.single_stream_ttft_by_prompt`: plain decoding, one request
at a time, measured on this hardware). Two servers bound the real one:

- `prefill only`: the server does nothing but prefill, at the single-stream speed, and
  decoding costs nothing (optimistic: utilisation = rate x mean prefill time). A request
  holds the server for its single-stream TTFT less the shortest prompt's (that part is
  HTTP, tokenizing and hops, which overlap other requests' steps) and waits for the
  requests ahead of it; its TTFT is that wait plus its whole single-stream TTFT;
- `whole request`: every request also brings its share of decode work, so that the
  server saturates at the measured closed-loop capacity (utilisation = the fraction).

Each runs first-come-first-served (a prompt waits for every prompt before it; what
chunked prefill in arrival order does) and shortest-prompt-first (non-preemptive). Ratios are against the single-stream TTFT p50 of the bench's four
length-spread requests (load.py `length_spread`), as `bench load` reports them; each
figure is the median and 5-95% range over `--runs` request sets of the bench's size.
"""
import argparse, json, os, sys

import numpy as np

from specserve_ray.bench import trace as tr
from specserve_ray.bench import workloads as wl
from specserve_ray.bench.load import length_spread
from specserve_ray.bench.queue_model import waits
from specserve_ray.bench.slo_rule import curve_at, monotone_curve

ap = argparse.ArgumentParser()
ap.add_argument("--capacity", type=float, default=2.48,
                help="closed-loop capacity, req/s (bench load's `capacity_req_s`)")
ap.add_argument("--fractions", default="0.3,0.5,0.7")
ap.add_argument("--calibration", default="specserve_ray/bench/results/sweep_fp32_code_pp.json")
ap.add_argument("--regime", default="fp32")
ap.add_argument("--requests", type=int, default=79, help="requests per run (the bench's)")
ap.add_argument("--runs", type=int, default=400)
ap.add_argument("--max-model-len", type=int, default=1024)
ap.add_argument("--trace-dir", default=None)
ap.add_argument("--json", default=None)
args = ap.parse_args()

cells = json.load(open(args.calibration))["calibration"][args.regime]
measured = next((c for c in cells.values() if c.get("single_stream_ttft_by_prompt")), None)
if measured is None:
    sys.exit(f"{args.calibration}: no single_stream_ttft_by_prompt in its {args.regime} calibration")
curve = monotone_curve(measured["single_stream_ttft_by_prompt"])     # (tokens, seconds)
spec, _ = wl.parse_workload("code-long")
rows = tr.load_trace(wl.find_trace(spec.trace, args.trace_dir))


def service_s(reqs):
    return np.array([curve_at(curve, r.input_tokens) for r in reqs])


# What a request occupies the server for: its single-stream TTFT less that of the shortest
# prompt (HTTP, tokenizing, the router's hop: work other processes do while the models
# run someone else's step), so the queue is never charged for what can overlap.
OVERLAP_S = curve[0][1]


# The single-stream reference, as the bench takes it: 4 length-spread requests of a mix.
mix = wl.make_requests(spec, "poisson", rows, 1.0, 64, 1, args.max_model_len)
single_p50 = float(np.median(service_s(length_spread(mix, 4))))


def one_run(rate, seed, stretch):
    reqs = wl.make_requests(spec, "poisson", rows, rate, args.requests, seed, args.max_model_len)
    arrivals = np.array([r.arrival_s for r in reqs])
    ttft_alone = service_s(reqs)
    prefill = ttft_alone - OVERLAP_S
    out = {}
    for server, service in (("prefill only", prefill), ("whole request", prefill * stretch)):
        for name, order in (("fcfs", lambda j: j), ("shortest first", lambda j: prefill[j])):
            ttft = waits(arrivals, service, order) + ttft_alone
            out[(server, name)] = (np.percentile(ttft, 50) / single_p50,
                                   np.percentile(ttft, 99) / single_p50)
    return out


# Mean prefill service over the mix, to fold decode work in for the `whole request` server.
mean_prefill = float(np.mean(service_s(wl.make_requests(spec, "poisson", rows, 1.0, 5000, 3,
                                                        args.max_model_len)))) - OVERLAP_S
stretch = max(1.0, (1.0 / args.capacity) / mean_prefill)
report = {"capacity_req_s": args.capacity, "overlap_s": OVERLAP_S, "single_stream_ttft_p50_s": single_p50,
          "mean_prefill_s": mean_prefill, "decode_stretch": stretch,
          "calibration": os.path.basename(args.calibration), "points": []}
print(f"single-stream TTFT p50 {single_p50 * 1e3:.0f} ms; mean server time {mean_prefill * 1e3:.0f} ms"
      f" a request; whole-request service x{stretch:.2f} (capacity {args.capacity} req/s)")
print("| load | server | order | utilisation | TTFT p50 / single | TTFT p99 / single |")
print("|---|---|---|---|---|---|")
for fraction in (float(f) for f in args.fractions.split(",")):
    rate = fraction * args.capacity
    runs = [one_run(rate, seed, stretch) for seed in range(args.runs)]
    for key in runs[0]:
        p50 = [r[key][0] for r in runs]
        p99 = [r[key][1] for r in runs]
        util = rate * mean_prefill * (stretch if key[0] == "whole request" else 1.0)
        q = lambda v: [round(float(x), 2) for x in np.percentile(v, [50, 5, 95])]
        point = {"fraction": fraction, "rate_req_s": rate, "server": key[0], "order": key[1],
                 "utilisation": util, "ttft_p50_ratio": q(p50), "ttft_p99_ratio": q(p99)}
        report["points"].append(point)
        a, b = point["ttft_p50_ratio"], point["ttft_p99_ratio"]
        print(f"| {fraction:.1f} ({rate:.2f} req/s) | {key[0]} | {key[1]} | {util:.2f} | "
              f"{a[0]:.2f} [{a[1]:.2f}, {a[2]:.2f}] | {b[0]:.2f} [{b[1]:.2f}, {b[2]:.2f}] |")
if args.json:
    json.dump(report, open(args.json, "w"), indent=1)
