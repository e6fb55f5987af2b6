"""Interleaved, repeated batch-1 greedy comparison of the drafters on both prompt sets.

    PYTHONPATH=. python scripts/compare_drafters.py --prompts 4 --new-tokens 96 --rounds 3

Each round times every (prompt set, drafter, k) configuration once, in a fixed order, so
machine noise spreads over all of them; reports median tok/s, min-max, and the median of
the per-round ratios to target-only (same round, same set).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from specserve_ray.bench.prompt_sets import prompt_set
from specserve_ray.bench.single import time_engine, time_hf
from specserve_ray.config import EngineConfig, LimitsConfig
from specserve_ray.engine import SpecEngine


def _parse_config(text: str) -> tuple[str, int, int]:
    parts = text.split(":")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", nargs="+", default=["model:1", "ngram:4", "ngram:8",
                                                    "model+ngram:4", "hf-lookup:10"],
                   help="drafter:k[:min_n]; hf-lookup:N = HF generate(prompt_lookup_num_tokens=N); "
                        "min_n = the shortest n-gram prompt lookup matches (default 1)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    engine = SpecEngine.from_config(EngineConfig(limits=LimitsConfig(max_model_len=1024,
                                                                     max_num_seqs=1)))
    sets = {s: prompt_set(s, engine.tokenizer, args.prompts, 64) for s in ("completion", "edit")}
    configs = [("none", 0, 1)] + [_parse_config(c) for c in args.configs]
    runs: dict[tuple, list] = {}
    for _ in range(args.rounds):
        for name, prompts in sets.items():
            for drafter, k, min_n in configs:
                if drafter == "hf-lookup":
                    r = {"tok_s": time_hf(engine.target.runner.model, None, prompts,
                                          args.new_tokens, prompt_lookup_num_tokens=k),
                         "mean_acceptance_length": float("nan")}
                else:
                    r = time_engine(engine, prompts, args.new_tokens, k,
                                    "model" if drafter == "none" else drafter,
                                    lookup=(min_n, max(min_n, 4)))
                runs.setdefault((name, drafter, k, min_n), []).append(r)
    report = []
    for (name, drafter, k, min_n), rs in runs.items():
        base = runs[(name, "none", 0, 1)]
        ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(rs, base)]
        tok_s = [r["tok_s"] for r in rs]
        row = {"prompt_set": name, "drafter": drafter, "k": k, "prompt_lookup_min": min_n,
               "tok_s_median": statistics.median(tok_s), "tok_s_min": min(tok_s),
               "tok_s_max": max(tok_s), "ratio_median": round(statistics.median(ratios), 3),
               "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
               "mean_acceptance_length": rs[-1]["mean_acceptance_length"]}
        report.append(row)
        print(f"{name:10s} {drafter:11s} k={k} n>={min_n}  {row['tok_s_median']:7.2f} tok/s "
              f"[{row['tok_s_min']:.2f}-{row['tok_s_max']:.2f}]  x{row['ratio_median']:.2f} "
              f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]  tokens/call "
              f"{row['mean_acceptance_length']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
