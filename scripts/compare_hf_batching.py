"""Ragged batches: this engine's slot cache + 4D masks vs transformers' own continuous
batching (paged KV cache, `generate_batch`), target-only greedy decoding of one batch.

    python scripts/compare_hf_batching.py --batch 8 --new-tokens 64 --rounds 3

Both sides decode the same held-out prompts (different lengths: a ragged batch) with the
embedded target in fp32, all rows admitted at once, no speculation. Exactness: each
side's tokens against Hugging Face `generate` run one prompt at a time. Speed: output
tokens/s over the whole batch, rounds interleaved, median and min-max. transformers'
manager runs on the same (oneDNN-prepacked) model object the engine uses, and on a fresh
stock one, so a faster layer alone cannot decide the comparison.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from specserve_ray.bench.prompt_sets import prompt_set
from specserve_ray.config import EngineConfig, LimitsConfig, ModelConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.engine import SpecEngine
from specserve_ray.models.runner import load_causal_lm
from specserve_kernels.packed_linear import prepack_linears

ASSETS = "specserve_ray/assets/tiny-pair"


def hf_one_by_one(model, prompts, n):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
            out.append(ids[0, len(p):].tolist())
    return out


def run_engine(engine, prompts, n):
    engine.speculation = SpeculationConfig(num_speculative_tokens=0)
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return [r.output_ids for r in results], len(prompts) * n / seconds


def run_hf_cb(model, prompts, n):
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    with torch.no_grad():
        # A kept manager, as a server would hold one: its setup is not timed after warm-up.
        results = model.generate_batch(inputs=prompts, generation_config=gc, warmup=False,
                                       persistent_manager=True)
    seconds = time.perf_counter() - start
    by_prompt = sorted(results.values(), key=lambda r: int(str(r.request_id).split("_")[-1]))
    return [list(r.generated_tokens)[:n] for r in by_prompt], len(prompts) * n / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = EngineConfig(target=ModelConfig(path=f"{ASSETS}/target"),
                       draft=ModelConfig(path=f"{ASSETS}/draft"),
                       limits=LimitsConfig(max_model_len=1024, max_num_seqs=args.batch))
    engine = SpecEngine.from_config(cfg)
    prompts = prompt_set("completion", engine.tokenizer, args.batch, args.prompt_tokens)
    # Ragged: trim prompts to different lengths, deterministically.
    prompts = [p[: max(16, len(p) - 11 * i)] for i, p in enumerate(prompts)]
    n = args.new_tokens
    stock = load_causal_lm(cfg.target)[0]
    # A second copy with the engine's prepacked layers (transformers switches the model's
    # attention implementation, so the engine's own object stays out of it).
    prepacked = load_causal_lm(cfg.target)[0]
    prepack_linears(prepacked)
    reference = hf_one_by_one(stock, prompts, n)

    sides = {"engine": lambda: run_engine(engine, prompts, n),
             "hf_cb_stock": lambda: run_hf_cb(stock, prompts, n),
             "hf_cb_prepacked": lambda: run_hf_cb(prepacked, prompts, n)}
    for fn in sides.values():  # warm-up, and the exactness check
        fn()
    rates = {name: [] for name in sides}
    exact = {}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            tokens, tok_s = fn()
            rates[name].append(tok_s)
            exact[name] = sum(a == b for a, b in zip(tokens, reference))
    report = {"batch": args.batch, "new_tokens": n, "prompt_lens": [len(p) for p in prompts],
              "threads": args.threads, "rounds": args.rounds,
              "tok_s": {k: {"median": round(statistics.median(v), 2),
                            "min": round(min(v), 2), "max": round(max(v), 2)}
                        for k, v in rates.items()},
              "rows_equal_to_hf_generate": {k: f"{v}/{len(prompts)}" for k, v in exact.items()}}
    base = statistics.median(rates["engine"])
    report["engine_over"] = {k: round(base / statistics.median(v), 3)
                             for k, v in rates.items() if k != "engine"}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
