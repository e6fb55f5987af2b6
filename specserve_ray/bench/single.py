"""`bench single`: batch-1 greedy decoding on held-out prompts, everything in one run.

Compares, on the same prompts and the same pair: target-only decoding, our speculative
engine at each static k and drafter (`--drafter model ngram model+ngram`) on each prompt
set (`--prompt-set completion edit`, bench/prompt_sets.py), and Hugging Face
`generate(assistant_model=...)` at its defaults and across its knobs, and its prompt-lookup
mode (`prompt_lookup_num_tokens`) on every set (the peer is given its best settings too).
It also measures the step costs and reports the cost-model limit: tokens per target call
over the time of one step. The top-level figures are the completion set's.
"""
from __future__ import annotations

import platform
import time

import torch

from specserve_ray.config import EngineConfig, LimitsConfig, ModelConfig, SamplingParams, SpeculationConfig
from specserve_ray.config import EMBEDDED_DRAFT, EMBEDDED_TARGET
from specserve_ray.engine import SpecEngine
from specserve_ray.bench.prompt_sets import PROMPT_SETS, prompt_set


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def time_engine(engine: SpecEngine, prompts, new_tokens: int, k: int, drafter: str = "model",
                lookup: tuple[int, int] = (2, 4)):
    engine.speculation = SpeculationConfig(num_speculative_tokens=k, drafter=drafter,
                                           prompt_lookup_min=lookup[0],
                                           prompt_lookup_max=lookup[1])
    engine.totals = type(engine.totals)()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompts[0]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    engine.totals = type(engine.totals)()
    start = time.perf_counter()
    for p in prompts:  # batch 1: one request at a time
        engine.generate([p], params)
    seconds = time.perf_counter() - start
    t = engine.totals
    return {"k": k, "tok_s": round(len(prompts) * new_tokens / seconds, 2),
            "acceptance_rate": round(t.acceptance_rate, 4),
            "mean_acceptance_length": round(t.mean_acceptance_length, 4)}


def time_hf(target, draft, prompts, new_tokens: int, num_assistant_tokens=None,
            confidence_threshold=None, prompt_lookup_num_tokens=None):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if prompt_lookup_num_tokens is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    if draft is not None:
        gc = draft.generation_config
        if num_assistant_tokens is not None:
            gc.num_assistant_tokens = num_assistant_tokens
            gc.num_assistant_tokens_schedule = "constant"
        if confidence_threshold is not None:
            gc.assistant_confidence_threshold = confidence_threshold
        kwargs["assistant_model"] = draft
    with torch.no_grad():
        target.generate(torch.tensor([prompts[0]]), **{**kwargs, "max_new_tokens": 8,
                                                     "min_new_tokens": 8})
        start = time.perf_counter()
        for p in prompts:
            target.generate(torch.tensor([p]), **kwargs)
        seconds = time.perf_counter() - start
    return round(len(prompts) * new_tokens / seconds, 2)


def step_costs(engine: SpecEngine, prompt: list[int], max_k: int, repeats: int = 30):
    """Median ms of a target forward of 1..max_k+1 tokens and of a 1-token draft step."""
    def timed(runner, sid, feed):
        runner.add(sid)
        runner.forward([sid], [prompt], all_logits=False)
        base = runner.cache_len(sid)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.forward([sid], [feed], all_logits=True)
            times.append(time.perf_counter() - t0)
            runner.truncate(sid, base)
        runner.release(sid)
        return _median(times) * 1000

    target = engine.target.runner
    costs = {"target_ms": {n: round(timed(target, "cost", prompt[:n]), 3)
                           for n in range(1, max_k + 2)}}
    if engine.draft is not None:
        costs["draft_ms"] = round(timed(engine.draft.runner, "cost", prompt[:1]), 3)
    return costs


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = EngineConfig(
        target=ModelConfig(path=args.target, dtype=args.dtype),
        draft=ModelConfig(path=args.draft, dtype=args.draft_dtype),
        limits=LimitsConfig(max_model_len=1024, max_num_seqs=1),
    )
    engine = SpecEngine.from_config(cfg)
    sets = {name: prompt_set(name, engine.tokenizer, args.prompts, args.prompt_tokens)
            for name in args.prompt_set}
    n = args.new_tokens
    ks = args.ks or list(range(1, args.max_k + 1))
    lookup = (args.prompt_lookup_min, args.prompt_lookup_max)
    print(f"{args.prompts} prompts per set x {n} new tokens, batch 1, greedy, "
          f"target {args.dtype}, draft {args.draft_dtype}, {args.threads} threads")

    per_k, by_set = [], {}
    for name, prompts in sets.items():
        base = {**time_engine(engine, prompts, n, k=0), "drafter": "none", "prompt_set": name}
        per_k.append(base)
        print(f"  [{name}] target-only            {base['tok_s']:8.2f} tok/s")
        summary = {"target_only_tok_s": base["tok_s"], "best": {}}
        for drafter in args.drafter:
            rows = []
            for k in ks:
                r = {**time_engine(engine, prompts, n, k, drafter, lookup), "drafter": drafter,
                     "prompt_set": name}
                rows.append(r)
                print(f"  [{name}] {drafter:11s} k={k}  {r['tok_s']:8.2f} tok/s  acceptance "
                      f"{r['acceptance_rate']:.3f}  tokens/call {r['mean_acceptance_length']:.2f}")
            per_k.extend(rows)
            top = max(rows, key=lambda r: r["tok_s"])
            summary["best"][drafter] = {"k": top["k"], "tok_s": top["tok_s"],
                                        "speedup": round(top["tok_s"] / base["tok_s"], 3)}
        by_set[name] = summary
    main_set = "completion" if "completion" in sets else next(iter(sets))
    prompts = sets[main_set]
    results = {"target_only": next(r for r in per_k if r["prompt_set"] == main_set)}
    best = max((r for r in per_k if r["prompt_set"] == main_set and r["k"] > 0),
               key=lambda r: r["tok_s"])

    target_model, draft_model = engine.target.runner.model, engine.draft.runner.model
    hf = {"target_only": time_hf(target_model, None, prompts, n)}
    hf["assisted_default"] = time_hf(target_model, draft_model, prompts, n)
    print(f"  HF generate target-only {hf['target_only']:8.2f} tok/s; assisted (defaults) "
          f"{hf['assisted_default']:8.2f} tok/s")
    sweep = {}
    for num in args.hf_assistant_tokens:
        for thr in (0.0, 0.4):
            key = f"n={num},threshold={thr}"
            sweep[key] = time_hf(target_model, draft_model, prompts, n, num, thr)
            print(f"  HF assisted {key:24s} {sweep[key]:8.2f} tok/s")
    hf_best_key = max(sweep, key=sweep.get) if sweep else None
    hf_best = max([hf["assisted_default"]] + ([sweep[hf_best_key]] if sweep else []))
    # HF prompt lookup (its n-gram mode) on every set, across its one knob.
    for name, set_prompts in sets.items():
        lookups = {}
        for num in args.hf_lookup_tokens:
            lookups[num] = time_hf(target_model, None, set_prompts, n,
                                   prompt_lookup_num_tokens=num)
            print(f"  [{name}] HF prompt lookup n={num}  {lookups[num]:8.2f} tok/s")
        by_set[name]["hf_prompt_lookup_tok_s"] = lookups
        if lookups:
            by_set[name]["hf_prompt_lookup_best_tok_s"] = max(lookups.values())

    costs = step_costs(engine, prompts[0], max(ks))
    k = best["k"]
    # An n-gram draft costs no forward; model+ngram rows may use either (upper bound).
    draft_ms = 0.0 if best["drafter"] == "ngram" else costs.get("draft_ms", 0.0)
    step_ms = costs["target_ms"][k + 1] + k * draft_ms
    limit = best["mean_acceptance_length"] / step_ms * 1000
    report = {
        "target_only_tok_s": results["target_only"]["tok_s"],
        "speculative_tok_s": best["tok_s"],
        "speedup_vs_target_only": round(best["tok_s"] / results["target_only"]["tok_s"], 3),
        "hf_assisted_tok_s": hf_best,
        "hf_assisted_default_tok_s": hf["assisted_default"],
        "hf_assisted_best_setting": (hf_best_key if sweep and sweep[hf_best_key] >= hf["assisted_default"]
                                     else "defaults"),
        "hf_target_only_tok_s": hf["target_only"],
        "speedup_vs_hf_assisted": round(best["tok_s"] / hf_best, 3),
        "best_k": k,
        "best_drafter": best["drafter"],
        "acceptance_rate": best["acceptance_rate"],
        "mean_acceptance_length": best["mean_acceptance_length"],
        "per_k": per_k,
        "hf_sweep": sweep,
        "by_prompt_set": by_set,
        "step_costs_ms": costs,
        "cost_model_limit_tok_s": round(limit, 2),
        "engine_share_of_limit": round(best["tok_s"] / limit, 3),
        "setup": {"prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
                  "prompt_sets": list(sets), "drafters": list(args.drafter),
                  "prompt_lookup_min": lookup[0], "prompt_lookup_max": lookup[1],
                  "new_tokens": n, "target_dtype": args.dtype, "draft_dtype": args.draft_dtype,
                  "threads": args.threads, "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine()},
    }
    print(f"best on {main_set}: {best['drafter']} k={k}: {best['tok_s']:.2f} tok/s = {report['speedup_vs_target_only']:.2f}x "
          f"target-only, {report['speedup_vs_hf_assisted']:.2f}x HF assisted (best); "
          f"cost-model limit {limit:.1f} tok/s (engine reaches {report['engine_share_of_limit']:.0%})")
    return report


def add_parser(sub):
    p = sub.add_parser("single", help="batch-1 greedy: target-only vs speculative vs HF assisted")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--target", default=EMBEDDED_TARGET)
    p.add_argument("--draft", default=EMBEDDED_DRAFT)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--draft-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--hf-assistant-tokens", type=int, nargs="*", default=[3, 5, 8])
    p.add_argument("--hf-lookup-tokens", type=int, nargs="*", default=[3, 5, 10],
                   help="HF prompt_lookup_num_tokens values to try on every prompt set")
    p.add_argument("--drafter", nargs="+", default=["model", "ngram", "model+ngram"],
                   choices=["model", "ngram", "model+ngram"])
    p.add_argument("--prompt-set", nargs="+", default=list(PROMPT_SETS), choices=PROMPT_SETS)
    p.add_argument("--ks", type=int, nargs="*", help="the static k values (default 1..max-k)")
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run)
