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

from specserve_ray.config import EngineConfig, LimitsConfig, ModelConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.config import EMBEDDED_DRAFT, EMBEDDED_TARGET
from specserve_ray.contracts import PrefillItem, SeqSampling
from specserve_ray.engine import SpecEngine
from specserve_ray.models.runner import load_causal_lm
from specserve_ray.bench.prompt_sets import PROMPT_SETS, prompt_set


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def time_engine(engine: SpecEngine, prompts, new_tokens: int, k: int, drafter: str = "model",
                lookup: tuple[int, int] = (1, 4)):
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


def _timed_runner(runner, prompts: list[list[int]], n: int, repeats: int) -> float:
    """Median ms of one runner forward of `n` new tokens per row (rows share nothing)."""
    ids = [f"cost{b}" for b in range(len(prompts))]
    for sid in ids:
        runner.add(sid)
    try:
        runner.forward(ids, prompts, all_logits=False)
        base = [runner.cache_len(sid) for sid in ids]
        feed = [p[:n] for p in prompts]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.forward(ids, feed, all_logits=True)
            runner.synchronize()
            times.append(time.perf_counter() - t0)
            for sid, b in zip(ids, base):
                runner.truncate(sid, b)
    finally:
        for sid in ids:
            runner.release(sid)
    return _median(times) * 1000


def _timed_hf(model, prompts: list[list[int]], n: int, repeats: int) -> float:
    """The same forward through a plain Hugging Face model and DynamicCache."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor(prompts), past_key_values=cache, use_cache=True)
        feed = torch.tensor([p[:n] for p in prompts])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=feed, past_key_values=cache, use_cache=True).logits.float().cpu()
            times.append(time.perf_counter() - t0)
            cache.crop(-n)
    return _median(times) * 1000


def _timed_propose(draft, prompt: list[int], k: int, repeats: int) -> float:
    """Median ms per drafted token of the whole `propose` (k tokens at batch 1, greedy),
    as the engine calls it: sync with the last emitted token, k forwards, the picks."""
    times = []
    for _ in range(repeats):
        draft.prefill([PrefillItem("propose", prompt[:-1], SeqSampling())])
        try:
            t0 = time.perf_counter()
            draft.propose(["propose"], [[prompt[-1]]], [k])
            times.append(time.perf_counter() - t0)
        finally:
            draft.release(["propose"])
    return _median(times) * 1000 / k


def step_costs(engine: SpecEngine, prompt: list[int], max_k: int, hf_target=None,
               hf_draft=None, repeats: int = 30):
    """Median ms of target forwards of 1..max_k+1 tokens (batch 1 and 8), of a 1-token
    draft forward and of the draft's propose loop per drafted token; each beside the same
    forward of a plain Hugging Face model (`hf_*`), when given."""
    tokens = range(1, max_k + 2)
    batch8 = [prompt[i:] + prompt[:i] for i in range(8)]    # 8 different rows, same length
    target = engine.target.runner
    costs = {"target_ms": {n: round(_timed_runner(target, [prompt], n, repeats), 3)
                           for n in tokens}}
    costs["target_ms_b8"] = {n: round(_timed_runner(target, batch8, n, repeats // 2), 3)
                             for n in tokens}
    if hf_target is not None:
        costs["hf_target_ms"] = {n: round(_timed_hf(hf_target, [prompt], n, repeats), 3)
                                 for n in tokens}
        costs["hf_target_ms_b8"] = {n: round(_timed_hf(hf_target, batch8, n, repeats // 2), 3)
                                    for n in tokens}
    if engine.draft is not None:
        costs["draft_ms"] = round(_timed_runner(engine.draft.runner, [prompt], 1, repeats), 3)
        costs["draft_propose_ms"] = {k: round(_timed_propose(engine.draft, prompt, k, repeats), 3)
                                     for k in sorted({1, min(4, max_k), max_k})}
        if hf_draft is not None:
            costs["hf_draft_ms"] = round(_timed_hf(hf_draft, [prompt], 1, repeats), 3)
    one = costs["target_ms"][1]
    five = min(5, max_k + 1)
    costs["ratios"] = {
        f"verify{five}_over_step1": round(costs["target_ms"][five] / one, 3),
        f"verify{five}_over_step1_b8": round(costs["target_ms_b8"][five]
                                             / costs["target_ms_b8"][1], 3)}
    if engine.draft is not None:
        per_token = costs["draft_propose_ms"][min(4, max_k)]
        costs["ratios"]["propose_over_step1"] = round(per_token / one, 4)
        if hf_draft is not None:
            costs["ratios"]["propose_over_hf_draft"] = round(per_token / costs["hf_draft_ms"], 3)
    return costs


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), per /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = EngineConfig(
        target=ModelConfig(path=args.target, dtype=args.dtype),
        draft=ModelConfig(path=args.draft, dtype=args.draft_dtype),
        limits=LimitsConfig(max_model_len=1024, max_num_seqs=8),   # 8: the b8 step costs
    )
    engine = SpecEngine.from_config(cfg)
    sets = {name: prompt_set(name, engine.tokenizer, args.prompts, args.prompt_tokens)
            for name in args.prompt_set}
    n = args.new_tokens
    ks = args.ks or list(range(1, args.max_k + 1))
    lookup = (args.prompt_lookup_min, args.prompt_lookup_max)
    print(f"{args.prompts} prompts per set x {n} new tokens, batch 1, greedy, "
          f"target {args.dtype}, draft {args.draft_dtype}, {args.threads} threads, "
          f"CPU native bf16: {'yes' if native_bf16() else 'no'}")

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

    # Hugging Face as a user runs it: fresh, untouched models (ours are prepacked in place).
    target_model = load_causal_lm(cfg.target)[0]
    draft_model = load_causal_lm(cfg.draft)[0]
    hf = {"target_only": time_hf(target_model, None, prompts, n)}
    # The engine's own (prepacked) model object under HF generate, so that a faster
    # layer alone cannot flatter the target-only baseline.
    hf["target_only_prepacked"] = time_hf(engine.target.runner.model, None, prompts, n)
    hf["assisted_default"] = time_hf(target_model, draft_model, prompts, n)
    print(f"  HF generate target-only {hf['target_only']:8.2f} tok/s (on our prepacked model "
          f"{hf['target_only_prepacked']:8.2f}); assisted (defaults) "
          f"{hf['assisted_default']:8.2f} tok/s")
    sweep = {}
    for num in args.hf_assistant_tokens:
        for thr in (0.0, 0.4):
            key = f"n={num},threshold={thr}"
            sweep[key] = time_hf(target_model, draft_model, prompts, n, num, thr)
            print(f"  HF assisted {key:24s} {sweep[key]:8.2f} tok/s")
    hf_best_key = max(sweep, key=sweep.get) if sweep else None
    if sweep:
        best_num, best_thr = (float(x.split("=")[1]) for x in hf_best_key.split(","))
        sweep[hf_best_key + ",prepacked"] = time_hf(engine.target.runner.model, draft_model,
                                                    prompts, n, int(best_num), best_thr)
        print(f"  HF assisted {hf_best_key} on our prepacked target "
              f"{sweep[hf_best_key + ',prepacked']:8.2f} tok/s")
        hf_best_key = max(sweep, key=sweep.get)
    hf_best = max([hf["assisted_default"]] + ([sweep[hf_best_key]] if sweep else []))
    target_only = max(results["target_only"]["tok_s"], hf["target_only"],
                      hf["target_only_prepacked"])
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

    costs = step_costs(engine, prompts[0], max(ks), target_model, draft_model)
    k = best["k"]
    # An n-gram draft costs no forward; model+ngram rows may use either (upper bound).
    propose = costs.get("draft_propose_ms", {})
    draft_ms = 0.0 if best["drafter"] == "ngram" else propose.get(k, costs.get("draft_ms", 0.0))
    step_ms = costs["target_ms"][k + 1] + k * draft_ms
    limit = best["mean_acceptance_length"] / step_ms * 1000
    report = {
        "target_only_tok_s": results["target_only"]["tok_s"],
        "speculative_tok_s": best["tok_s"],
        "target_only_baseline_tok_s": target_only,
        "speedup_vs_target_only": round(best["tok_s"] / target_only, 3),
        "speedup_vs_engine_k0": round(best["tok_s"] / results["target_only"]["tok_s"], 3),
        "ms_per_token": {"speculative": round(1000 / best["tok_s"], 2),
                         "target_only_baseline": round(1000 / target_only, 2),
                         "hf_assisted_best": round(1000 / hf_best, 2)},
        "hf_assisted_tok_s": hf_best,
        "hf_assisted_default_tok_s": hf["assisted_default"],
        "hf_assisted_best_setting": (hf_best_key if sweep and sweep[hf_best_key] >= hf["assisted_default"]
                                     else "defaults"),
        "hf_target_only_tok_s": hf["target_only"],
        "hf_target_only_prepacked_tok_s": hf["target_only_prepacked"],
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
                  "cpu_native_bf16": native_bf16(), "prepacked": engine.target.runner.prepacked,
                  "cpu": platform.processor() or platform.machine()},
    }
    if args.repeats > 1:
        from specserve_ray.bench.single_repeats import repeat_ab

        print(f"repeats on {main_set}: the key ratios {args.repeats} times, interleaved")
        report["repeats"] = repeat_ab(engine, target_model, draft_model, prompts, n, best,
                                      report["hf_assisted_best_setting"], args.repeats, lookup)
    r = costs["ratios"]
    kk = min(4, max(ks))
    print(f"step costs: target 1/5 tokens {costs['target_ms'][1]:.2f}/{costs['target_ms'].get(5, 0):.2f} ms "
          f"(HF {costs['hf_target_ms'][1]:.2f}/{costs['hf_target_ms'].get(5, 0):.2f}), verify/step "
          f"{r}; draft propose {costs['draft_propose_ms'][kk]:.3f} "
          f"ms/token at k={kk} (HF draft forward {costs['hf_draft_ms']:.3f}) = 1/"
          f"{1 / r['propose_over_step1']:.1f} of a target step")
    print(f"best on {main_set}: {best['drafter']} k={k}: {best['tok_s']:.2f} tok/s = "
          f"{report['speedup_vs_target_only']:.2f}x target-only ({target_only:.2f} tok/s, the best "
          f"of engine k=0 and HF generate), {report['speedup_vs_hf_assisted']:.2f}x HF assisted (best); "
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
    p.add_argument("--prompt-lookup-min", type=int, default=1)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3,
                   help="re-time the key ratios' contenders N times, interleaved, and report "
                   "each ratio's median and range under 'repeats' (1 = the single run only)")
    p.set_defaults(func=run)
