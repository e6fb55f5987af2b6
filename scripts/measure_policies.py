"""Usage: PYTHONPATH=.:kernels python scripts/measure_policies.py [--reps 5] [--batches 1,8]
          [--policies specserve,static:1,static:2,static:3,none] [--drafter model]

Side-by-side tokens/s of speculation policies: in-process engine, embedded pair, fp32,
greedy, interleaved repetitions in shuffled order. One engine; policies switched between
runs (learned state kept, as in serving). Each run: `batch` held-out prompts of 64
tokens, 96 output tokens each (ignore_eos); batch 1 rotates over 8 prompts.

For every policy: mean tok/s, min..max, ratio to `none`, and the paired ratio to the best
static k (per repetition, against the static k best on average), its mean and a 95% t
interval. `specserve+inloop` is specserve with its in-loop rules (per-row early stop and
verify trim, control.DraftControl) switched on, as it ran before they became opt-in."""
import argparse, math, random, statistics, tempfile, time
from specserve_ray.config import EngineConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.engine import SpecEngine
from specserve_ray.prompts import held_out_prompts

ap = argparse.ArgumentParser()
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--batches", default="1,8")
ap.add_argument("--policies", default="specserve,static:1,static:2,static:3,none")
ap.add_argument("--drafter", default="model", choices=["model", "ngram"])
ap.add_argument("--max-k", type=int, default=4)
args = ap.parse_args()
POLICIES = args.policies.split(",")
BATCHES = [int(b) for b in args.batches.split(",")]
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}

cfg = EngineConfig(speculation={"num_speculative_tokens": args.max_k, "policy": "specserve",
                                "profile_budget_s": 10.0, "drafter": args.drafter},
                   limits={"max_model_len": 512, "max_num_seqs": max(8, max(BATCHES))})
t0 = time.perf_counter()
engine = SpecEngine.from_config(cfg, cache_dir=tempfile.mkdtemp())
print(f"load+profile {time.perf_counter() - t0:.1f}s", flush=True)
if args.drafter == "ngram":     # prompt lookup pays where the output repeats its prompt
    from specserve_ray.bench.prompt_sets import prompt_set
    prompts = prompt_set("completion", engine.tokenizer, 16, 64)
else:
    prompts = held_out_prompts(engine.tokenizer, 16, 64, seed=1)
params = SamplingParams(max_tokens=96, ignore_eos=True)


def run(policy, batch, rep):
    name, _, variant = policy.partition("+")
    engine.speculation = SpeculationConfig(num_speculative_tokens=args.max_k, policy=name,
                                           drafter=args.drafter)
    if variant == "inloop":
        engine.chooser.policy.in_loop = True
    chosen_before = list(engine.chooser.chosen_k_counts)
    ps = prompts[(rep * batch) % 8:][:batch] if batch == 1 else prompts[:batch]
    start = time.perf_counter()
    outs = engine.generate(ps, params)
    sec = time.perf_counter() - start
    tokens = sum(len(o.output_ids) for o in outs)
    counts = [a - b for a, b in zip(engine.chooser.chosen_k_counts, chosen_before + [0] * 20)]
    return tokens / sec, counts


for batch in BATCHES:
    for p in POLICIES:                       # warm-up (also teaches specserve)
        run(p, batch, 0)
results = {}
rng = random.Random(0)
for rep in range(args.reps):
    for batch in BATCHES:
        order = POLICIES[:]
        rng.shuffle(order)
        for p in order:
            tps, counts = run(p, batch, rep)
            results.setdefault((batch, p), []).append(tps)
            print(f"rep {rep} B={batch} {p:16s} {tps:7.1f} tok/s  rows per k {counts}", flush=True)


def ci95(values):
    m = statistics.mean(values)
    if len(values) < 2:
        return m, m, m
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


statics = [p for p in POLICIES if p.startswith("static")]
print(f"\n{args.reps} reps, drafter {args.drafter}, max k {args.max_k}")
print("batch policy            mean tok/s  (min..max)  vs none  paired vs best static [95% CI]")
for batch in BATCHES:
    none = statistics.mean(results[batch, "none"]) if (batch, "none") in results else float("nan")
    best = max(statics, key=lambda p: statistics.mean(results[batch, p])) if statics else None
    for p in POLICIES:
        v = results[batch, p]
        line = (f"{batch:5d} {p:16s} {statistics.mean(v):8.1f}  ({min(v):.1f}..{max(v):.1f})  "
                f"{statistics.mean(v) / none:5.2f}x")
        if best is not None:
            m, lo, hi = ci95([a / b for a, b in zip(v, results[batch, best])])
            line += f"  {m:5.3f}x [{lo:.3f}, {hi:.3f}] vs {best}"
        print(line)
learned = engine.chooser.learned
print("learned prior", round(learned.prior(), 3), "goodput cells",
      {f"{b},{k}": round(v, 2) for (b, k), v in sorted(learned.goodput.log_ratio.items())})
