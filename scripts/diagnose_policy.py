"""Usage: PYTHONPATH=.:kernels python scripts/diagnose_policy.py [--batches 1,8] [--max-k 5]

Why does specserve pick the k it picks? In-process engine, embedded pair, fp32, greedy.

1. The profile (the cost model fitted at start-up) against measured step times: every
   static k = 0..max_k at each batch size, mean of the steps' draft+verify seconds,
   next to what `cost.predict_step` says for that shape.
2. specserve, logged per step: the cap it chose, per-row verified / accepted counts,
   predicted vs observed step seconds, the mean confidence it decided with vs the
   realized acceptance, probes, and the CPU it spent deciding (plan + apply, outside
   the timed step) and inside the draft loop (DraftControl).
"""
import argparse, collections, statistics, tempfile, time

import numpy as np

from specserve_ray.config import EngineConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.engine import SpecEngine
from specserve_ray.policy import control as control_mod
from specserve_ray.prompts import held_out_prompts

ap = argparse.ArgumentParser()
ap.add_argument("--batches", default="1,8")
ap.add_argument("--max-k", type=int, default=5)
ap.add_argument("--tokens", type=int, default=96)
ap.add_argument("--budget", type=float, default=10.0)
ap.add_argument("--skip-profile-check", action="store_true")
args = ap.parse_args()
batches = [int(b) for b in args.batches.split(",")]

cfg = EngineConfig(speculation={"num_speculative_tokens": 4, "policy": "specserve",
                                "profile_budget_s": args.budget},
                   limits={"max_model_len": 512, "max_num_seqs": 8})
t0 = time.perf_counter()
engine = SpecEngine.from_config(cfg, cache_dir=tempfile.mkdtemp())
print(f"load+profile {time.perf_counter() - t0:.1f}s", flush=True)
cost = engine.cost_model
print("verify coef", [f"{c:.3g}" for c in cost.verify_coef])
print("draft coef ", [f"{c:.3g}" for c in cost.draft_coef])
prompts = held_out_prompts(engine.tokenizer, 16, 64, seed=1)
params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)

# Time the in-loop rules (they run inside the timed draft call).
in_loop = collections.Counter()
for name in ("should_continue", "select_verify"):
    original = getattr(control_mod.DraftControl, name)

    def timed(self, *a, _orig=original, _name=name, **kw):
        s = time.perf_counter()
        try:
            return _orig(self, *a, **kw)
        finally:
            in_loop[_name] += time.perf_counter() - s
    setattr(control_mod.DraftControl, name, timed)

steps = []


def step():
    s0 = time.perf_counter()
    plan = engine.plan_step()
    s1 = time.perf_counter()
    if plan is None:
        return []
    decision = engine.chooser._decision
    from specserve_ray.workers.host import run_draft, run_target
    result = run_target(engine.target, run_draft(engine.draft, plan))
    s2 = time.perf_counter()
    out = engine.apply_step(plan, result, s2 - s1)
    s3 = time.perf_counter()
    if result.verify is not None and not plan.prefill:
        prop = result.proposal
        verified = prop.num_draft_tokens.tolist() if prop is not None else [0] * len(plan.decode_ids)
        steps.append(dict(
            batch=len(plan.decode_ids), caps=list(plan.num_draft), verified=verified,
            accepted=[int(a) for a in result.verify.num_accepted],
            draft_s=prop.seconds if prop is not None else 0.0, verify_s=result.verify.seconds,
            run_s=s2 - s1, plan_s=s1 - s0, apply_s=s3 - s2,
            probe=bool(decision.probe) if decision is not None else False,
            conf=float(np.mean(decision.confidence)) if decision is not None and decision.confidence else None,
            context=decision.context if decision is not None else 0.0))
    return out


engine.step = step


def run(policy, batch):
    engine.speculation = SpeculationConfig(num_speculative_tokens=args.max_k, policy=policy)
    steps.clear()
    in_loop.clear()
    ps = prompts[:batch]
    start = time.perf_counter()
    outs = engine.generate(ps, params)
    sec = time.perf_counter() - start
    return sum(len(o.output_ids) for o in outs) / sec, list(steps), dict(in_loop)


print("\n== 1. profile vs measured (static k, decode steps only, no prefill) ==")
for batch in ([] if args.skip_profile_check else batches):
    for k in range(args.max_k + 1):
        run(f"static:{k}", batch)          # warm-up
        tps, st, _ = run(f"static:{k}", batch)
        run_s = statistics.median(s["run_s"] for s in st)
        ctx = statistics.median(s["context"] for s in st) if st[0]["context"] else 100
        ctx = statistics.median(len(p) for p in prompts[:batch]) + args.tokens / 2
        pred = float(cost.reference().predict_step(batch, k, ctx))
        acc = sum(sum(s["accepted"]) for s in st) / max(sum(sum(s["verified"]) for s in st), 1)
        tok_step = statistics.mean((sum(s["accepted"]) + s["batch"]) for s in st)
        plan_apply = statistics.median(s["plan_s"] + s["apply_s"] for s in st)
        print(f"B={batch} k={k}: {tps:6.1f} tok/s  step {run_s*1e3:6.2f} ms (draft "
              f"{statistics.median(s['draft_s'] for s in st)*1e3:5.2f} verify "
              f"{statistics.median(s['verify_s'] for s in st)*1e3:5.2f})  predicted {pred*1e3:6.2f} ms"
              f"  obs/pred {run_s/pred:4.2f}  accept/token {acc:.2f}  tokens/step {tok_step:.2f}"
              f"  plan+apply {plan_apply*1e3:.2f} ms", flush=True)

print("\n== 2. specserve per step ==")
for batch in batches:
    run("specserve", batch)                  # warm-up (teaches it)
    tps, st, loop = run("specserve", batch)
    ks = collections.Counter(max(s["caps"]) for s in st)
    vk = collections.Counter(max(s["verified"]) for s in st)
    probes = sum(s["probe"] for s in st)
    realized = sum(sum(s["accepted"]) for s in st) / max(sum(sum(s["verified"]) for s in st), 1)
    confs = [s["conf"] for s in st if s["conf"] is not None]
    print(f"B={batch}: {tps:.1f} tok/s, {len(st)} steps, caps {dict(sorted(ks.items()))}, "
          f"verified widths {dict(sorted(vk.items()))}, probes {probes}")
    print(f"   mean decision confidence {np.mean(confs):.3f}  realized acceptance/token {realized:.3f}"
          f"  prior {engine.chooser.learned.prior():.3f}")
    print(f"   plan {np.median([s['plan_s'] for s in st])*1e3:.2f} ms  apply "
          f"{np.median([s['apply_s'] for s in st])*1e3:.2f} ms  (median per step)  in-loop "
          f"{ {k: round(v / len(st) * 1e3, 2) for k, v in loop.items()} } ms/step")
    by_k = collections.defaultdict(list)
    for s in st:
        by_k[max(s["caps"])].append(s)
    for k, group in sorted(by_k.items()):
        pred = float(cost.reference().predict_step(batch, k, statistics.median(g["context"] for g in group)))
        print(f"   cap {k}: {len(group)} steps, run {np.median([g['run_s'] for g in group])*1e3:.2f} ms"
              f" predicted(ref) {pred*1e3:.2f} ms  verified-width {np.mean([max(g['verified']) for g in group]):.2f}"
              f" tokens/step {np.mean([sum(g['accepted']) + g['batch'] for g in group]):.2f}")
    for s in st[:12]:
        print("   ", {k: (round(v * 1e3, 2) if k.endswith("_s") else v) for k, v in s.items()})
learned = engine.chooser.learned
print("goodput cells", {f"{b},{k}": round(v, 2) for (b, k), v in sorted(learned.goodput.log_ratio.items())})
print("overhead", cost.step_overhead, "scale", cost.scale)
print("depth acceptance", [round(learned.acceptance_of().rate(j), 2) for j in range(6)])
