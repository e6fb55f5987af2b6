"""Speculation policies on a GPU with large random-initialized models, at a synthetic
acceptance rate. BENCHMARK ONLY, NOT LOSSLESS: the target accepts each draft token with
the configured probability instead of verifying it (workers/synthetic.py); every forward
still runs, so the step costs are the hardware's own.

    python scripts/gpu_policies.py --acceptance 0.7 --json gpu_policies.json

Target: a Llama with TinyLlama-1.1B's shape; draft: a 4-layer, 512-wide Llama on the same
32k vocabulary; both bf16 on cuda:0, random weights (time does not depend on them). The
cost model is profiled on these runners exactly as the workers do at start-up. For each
batch size every policy generates the same number of tokens per request, in-process.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


class _NoTextTokenizer:
    """The engine only needs an EOS id and a decode; these models have no tokenizer."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def build(acceptance: float, max_seqs: int, max_model_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from specserve_ray.models.runner import ModelRunner
    from specserve_ray.workers.draft import DraftWorker
    from specserve_ray.workers.target import TargetWorker

    shapes = {"target": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4),
              "draft": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2)}
    runners = {}
    torch.manual_seed(0)
    for role, shape in shapes.items():
        cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **shape)
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa",
                                                  dtype=torch.bfloat16).eval()
        runners[role] = ModelRunner(model, max_seqs, max_model_len, role)
    return (TargetWorker(runners["target"], synthetic_acceptance_rate=acceptance),
            DraftWorker(runners["draft"]), runners)


def _measure(engine, policy: str, max_k: int, prompts, params) -> dict:
    from specserve_ray.config import SpeculationConfig
    from specserve_ray.sampling_params import SamplingParams

    engine.speculation = SpeculationConfig(num_speculative_tokens=max_k, policy=policy)
    engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))   # warm-up
    before = engine.totals.copy()
    k_sum, k_rows = engine.chooser.chosen_k_sum, engine.chooser.chosen_k_rows
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.output_ids) for o in outs)
    steps = engine.totals.num_steps - before.num_steps
    accepted = engine.totals.num_accepted_tokens - before.num_accepted_tokens
    rows = engine.chooser.chosen_k_rows - k_rows
    k_sum = engine.chooser.chosen_k_sum - k_sum
    return {"tok_s": round(tokens / seconds, 1),
            "mean_acceptance_length": round(1 + accepted / steps, 3) if steps else None,
            "mean_chosen_k": round(k_sum / rows, 2) if rows else 0.0}


def main() -> None:
    from specserve_ray.config import LimitsConfig, SpeculationConfig
    from specserve_ray.sampling_params import SamplingParams
    from specserve_ray.engine import SpecEngine
    from specserve_ray.policy.profile import profile_cost_model, profile_runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acceptance", type=float, default=0.7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--policies", nargs="+",
                        default=["none", "static:1", "static:3", "static:5", "smartspec",
                                 "specserve"])
    parser.add_argument("--max-k", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--profile-budget", type=float, default=30.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    max_seqs, max_len = max(args.batches), args.prompt_tokens + args.new_tokens + 16
    target, draft, runners = build(args.acceptance, max_seqs, max_len)
    start = time.perf_counter()
    cost = profile_cost_model(
        lambda grid, budget: profile_runner(runners["target"], "verify", grid, 3, budget),
        lambda grid, budget: profile_runner(runners["draft"], "draft", grid, 3, budget),
        max_seqs, args.max_k, max_len, args.profile_budget)
    print(f"profiled in {time.perf_counter() - start:.1f} s; verify ms at batch 1, 1..6 "
          f"tokens: {[round(float(cost.predict_verify(1, t, 128)) * 1e3, 2) for t in range(1, 7)]}; "
          f"draft step ms: {float(cost.predict_draft_step(1, 128)) * 1e3:.2f}", flush=True)
    engine = SpecEngine(target, draft, _NoTextTokenizer(),
                        LimitsConfig(max_model_len=max_len, max_num_seqs=max_seqs,
                                     max_tokens=args.new_tokens),
                        SpeculationConfig(num_speculative_tokens=args.max_k), cost_model=cost)
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    report = {"device": torch.cuda.get_device_name(0), "acceptance": args.acceptance,
              "synthetic": "BENCHMARK ONLY, NOT LOSSLESS", "runs": []}
    for batch in args.batches:
        prompts = torch.randint(0, 32000, (batch, args.prompt_tokens), generator=gen).tolist()
        rounds: dict[str, list[dict]] = {p: [] for p in args.policies}
        # Two rounds, the second in reverse order, each run warmed up at its full batch:
        # first-time shapes and clock ramps must not favour whoever runs later.
        for order in (args.policies, args.policies[::-1]):
            for policy in order:
                rounds[policy].append(_measure(engine, policy, args.max_k, prompts, params))
        row = {}
        for policy, runs in rounds.items():
            entry = {"batch": batch, "policy": policy,
                     "tok_s": round(sum(r["tok_s"] for r in runs) / len(runs), 1),
                     "tok_s_rounds": [r["tok_s"] for r in runs],
                     "mean_acceptance_length": runs[-1]["mean_acceptance_length"],
                     "mean_chosen_k": runs[-1]["mean_chosen_k"]}
            report["runs"].append(entry)
            row[policy] = entry["tok_s"]
            print(entry, flush=True)
        best_static = max(v for p, v in row.items() if p.startswith("static"))
        print(f"batch {batch}: specserve / none = {row['specserve'] / row['none']:.2f}x, "
              f"specserve / best static = {row['specserve'] / best_static:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
