"""Offline study of prompt-lookup settings along the target's own greedy output.

    PYTHONPATH=.:kernels python scripts/study_ngram.py --prompts 24 --new-tokens 96

Greedy target output is fixed (speculation is lossless), so how many tokens a step emits
with a given n-gram rule can be replayed without the model: at each step propose k tokens
from prompt + output so far, accept the longest prefix that agrees with the output, emit
that plus one. The first 4 prompts of each set are the ones `bench single` and
`scripts/compare_drafters.py` time; settings are chosen on the others (`tune`) and only
read on those 4 (`bench4`), so no default is fitted to the benchmark's own prompts.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from specserve_ray.bench.prompt_sets import prompt_set
from specserve_ray.config import EngineConfig, LimitsConfig, ModelConfig, EMBEDDED_TARGET
from specserve_ray.drafting.ngram import propose
from specserve_ray.engine import SpecEngine
from specserve_ray.sampling_params import SamplingParams

RULES = [(4, 2, 4), (6, 2, 4), (8, 2, 4), (6, 1, 4), (8, 1, 4), (8, 2, 8), (8, 3, 8),
         (8, 1, 8), (16, 1, 4)]                                   # (k, min_n, max_n)


def tokens_per_step(cases: list[tuple[list[int], list[int]]], k: int, min_n: int,
                    max_n: int) -> float:
    steps = 0
    for prompt, output in cases:
        i = 0
        while i < len(output):
            draft, _ = propose(np.asarray(prompt + output[:i], np.int64), k, min_n, max_n)
            accepted = 0
            while (accepted < len(draft) and i + accepted < len(output)
                   and draft[accepted] == output[i + accepted]):
                accepted += 1
            i += accepted + 1
            steps += 1
    return sum(len(out) for _, out in cases) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    engine = SpecEngine.from_config(EngineConfig(
        target=ModelConfig(path=EMBEDDED_TARGET, dtype="float32"), draft=None,
        limits=LimitsConfig(max_model_len=1024, max_num_seqs=8)))
    report = []
    for name in ("edit", "completion"):
        prompts = prompt_set(name, engine.tokenizer, args.prompts, 64)
        results = engine.generate(prompts, SamplingParams(max_tokens=args.new_tokens,
                                                          ignore_eos=True))
        cases = [(p, r.output_ids) for p, r in zip(prompts, results)]
        for k, min_n, max_n in RULES:
            row = {"prompt_set": name, "k": k, "prompt_lookup_min": min_n,
                   "prompt_lookup_max": max_n,
                   "tune": round(tokens_per_step(cases[4:], k, min_n, max_n), 3),
                   "bench4": round(tokens_per_step(cases[:4], k, min_n, max_n), 3)}
            report.append(row)
            print(f"{name:10s} k={k:2d} n in [{min_n}, {max_n}]  tokens/step: tune "
                  f"{row['tune']:.3f} ({len(cases) - 4} prompts), bench4 {row['bench4']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
