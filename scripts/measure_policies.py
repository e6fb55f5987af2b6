"""Usage: PYTHONPATH=.:kernels python scripts/measure_policies.py

Side-by-side tokens/s: specserve vs static:1 vs static:3 vs none, in-process engine,
embedded pair, fp32, greedy, batch 1 and 8, 3 interleaved repetitions (shuffled order).

One engine; policies switched between runs (learned state kept, as in serving). Each
run: `batch` held-out prompts of 64 tokens, 96 output tokens each (ignore_eos)."""
import json, random, statistics, sys, tempfile, time
from transformers import AutoTokenizer
from specserve_ray.config import EngineConfig, SamplingParams, SpeculationConfig
from specserve_ray.engine import SpecEngine
from specserve_ray.prompts import held_out_prompts

POLICIES = ["specserve", "static:1", "static:3", "none"]
cfg = EngineConfig(speculation={"num_speculative_tokens": 4, "policy": "specserve",
                                "profile_budget_s": 10.0},
                   limits={"max_model_len": 512, "max_num_seqs": 8})
t0 = time.perf_counter()
engine = SpecEngine.from_config(cfg, cache_dir=tempfile.mkdtemp())
print(f"load+profile {time.perf_counter() - t0:.1f}s", flush=True)
prompts = held_out_prompts(engine.tokenizer, 16, 64, seed=1)
params = SamplingParams(max_tokens=96, ignore_eos=True)

def run(policy, batch, rep):
    engine.speculation = SpeculationConfig(num_speculative_tokens=4, policy=policy)
    chosen_before = list(engine.chosen_k_counts)
    ps = prompts[(rep * batch) % 8:][:batch] if batch == 1 else prompts[:batch]
    start = time.perf_counter()
    outs = engine.generate(ps, params)
    sec = time.perf_counter() - start
    tokens = sum(len(o.output_ids) for o in outs)
    counts = [a - b for a, b in zip(engine.chosen_k_counts, chosen_before + [0] * 20)]
    return tokens / sec, counts

for batch in (1, 8):
    for p in POLICIES:                       # warm-up (also teaches specserve)
        run(p, batch, 0)
results = {}
rng = random.Random(0)
for rep in range(3):
    for batch in (1, 8):
        order = POLICIES[:]
        rng.shuffle(order)
        for p in order:
            tps, counts = run(p, batch, rep)
            results.setdefault((batch, p), []).append(tps)
            print(f"rep {rep} B={batch} {p:10s} {tps:7.1f} tok/s  rows per k {counts}", flush=True)
print("\nbatch policy      mean tok/s  (min..max)  ratio vs none  vs best static")
for batch in (1, 8):
    none = statistics.mean(results[batch, "none"])
    best = max(statistics.mean(results[batch, p]) for p in ("static:1", "static:3"))
    for p in POLICIES:
        v = results[batch, p]
        print(f"{batch:5d} {p:10s} {statistics.mean(v):8.1f}  ({min(v):.1f}..{max(v):.1f})  "
              f"{statistics.mean(v) / none:5.2f}x  {statistics.mean(v) / best:5.2f}x")
print("learned prior", round(engine.learned.prior(), 3), "goodput cells",
      {f"{b},{k}": round(v, 2) for (b, k), v in sorted(engine.learned.goodput.log_ratio.items())})
