"""GPU checks for a machine with CUDA (run by hand; CI has no GPU).

    python scripts/gpu_check.py --json gpu_check.json

1. Exactness on CUDA: the embedded pair, target in float32 and bfloat16 on the GPU;
   speculative greedy output (k = 1, 4, 8 at batch 1; mixed k at batch 8) against
   Hugging Face target-only greedy on the same device and dtype. A divergence counts as
   explained only where the target's top two logits are within a few bf16/fp32 units of
   each other (batched scoring rounds differently from one-at-a-time scoring).
2. The rejection-sampling kernel on CUDA tensors equals its CPU result.
3. The cost regime of a large target: a random-initialized Llama (TinyLlama-1.1B shape)
   in bf16 timed by the same profiler the workers use at start-up (`profile_runner`):
   verification time against tokens per request, at batch 1 to 64. Random weights
   change nothing about the time of a forward.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def near_tie(logits: torch.Tensor, mantissa_bits: int) -> bool:
    top2 = torch.topk(logits.float(), 2).values
    ulp = 2.0 ** (torch.floor(torch.log2(top2[0].abs().clamp(min=1e-3))) - mantissa_bits)
    return bool(top2[0] - top2[1] <= 4 * ulp)


def exactness(dtype: str, new_tokens: int = 32) -> dict:
    from specserve_ray.config import (EMBEDDED_DRAFT, EMBEDDED_TARGET, EngineConfig,
                                      LimitsConfig, ModelConfig)
    from specserve_ray.sampling_params import SamplingParams
    from specserve_ray.engine import SpecEngine
    from specserve_ray.prompts import held_out_prompts

    engine = SpecEngine.from_config(EngineConfig(
        target=ModelConfig(path=EMBEDDED_TARGET, dtype=dtype, device="cuda"),
        draft=ModelConfig(path=EMBEDDED_DRAFT, dtype=dtype, device="cuda"),
        limits=LimitsConfig(max_model_len=512, max_num_seqs=8)))
    model = engine.target.runner.model
    bits = 7 if dtype == "bfloat16" else 23
    prompts = held_out_prompts(engine.tokenizer, 8, 48)
    refs, ref_logits = [], []
    with torch.no_grad():
        for p in prompts:
            gen = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            refs.append(gen.sequences[0, len(p):].tolist())
            ref_logits.append([lg[0].cpu() for lg in gen.logits])
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    runs = [(f"batch1_k{k}", [i], [k]) for k in (1, 4, 8) for i in range(8)]
    runs.append(("batch8_mixed_k", list(range(8)), [1, 2, 3, 4, 5, 6, 7, 8]))
    exact = explained = unexplained = 0
    for name, rows, ks in runs:
        outs = engine.generate([prompts[i] for i in rows], params, num_speculative_tokens=ks)
        for i, out in zip(rows, outs):
            if out.output_ids == refs[i]:
                exact += 1
                continue
            first = next(j for j, (a, b) in enumerate(zip(out.output_ids, refs[i])) if a != b)
            if near_tie(ref_logits[i][first], bits):
                explained += 1
            else:
                unexplained += 1
                print(f"  UNEXPLAINED divergence {dtype} {name} prompt {i} at token {first}")
    totals = engine.totals
    return {"dtype": dtype, "sequences": exact + explained + unexplained, "exact": exact,
            "near_tie_divergences": explained, "unexplained_divergences": unexplained,
            "mean_acceptance_length": round(1 + totals.num_accepted_tokens /
                                            max(totals.num_steps, 1), 3)}


def kernel_parity() -> dict:
    from specserve_ray.core.rejection import rejection_sample

    gen = torch.Generator().manual_seed(0)
    batch, k, vocab = 16, 5, 512
    draft_ids = torch.randint(0, vocab, (batch, k), generator=gen)
    num_draft = torch.randint(0, k + 1, (batch,), generator=gen)
    draft_probs = torch.softmax(torch.randn(batch, k, vocab, generator=gen), -1)
    target_probs = torch.softmax(torch.randn(batch, k + 1, vocab, generator=gen), -1)
    target_argmax = target_probs.argmax(-1)
    is_greedy = torch.rand(batch, generator=gen) < 0.5
    uniform = torch.rand(batch, k, generator=gen)
    noise = torch.empty(batch, vocab).exponential_(generator=gen)
    args = (draft_ids, num_draft, draft_probs, target_probs, target_argmax, is_greedy, uniform, noise)
    cpu_ids, cpu_n = rejection_sample(*args)
    gpu_ids, gpu_n = rejection_sample(*(a.cuda() for a in args))
    return {"rejection_sample_equal": bool(torch.equal(cpu_ids, gpu_ids.cpu())
                                           and torch.equal(cpu_n, gpu_n.cpu()))}


def cost_regime(budget_s: float) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from specserve_ray.models.runner import ModelRunner
    from specserve_ray.policy import CostModel
    from specserve_ray.policy.profile import profile_runner

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa",
                                              torch_dtype=torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    runner = ModelRunner(model, 64, 1024, "target")
    grid = [(b, b * t, 512.0) for b in (1, 8, 32, 64) for t in (1, 2, 3, 5, 9)]
    start = time.perf_counter()
    samples = profile_runner(runner, "verify", grid, repeats=5, time_budget_s=budget_s)
    table = {}
    for s in samples:
        table.setdefault(s.batch, {})[s.tokens // s.batch] = round(s.seconds * 1e3, 3)
    ratios = {b: {t: round(ms / row[1], 3) for t, ms in row.items()} for b, row in table.items()
              if 1 in row}
    model_fit = CostModel().fit(samples)
    return {"model": "random Llama, TinyLlama-1.1B shape, bf16", "params": params,
            "context": 512, "profile_seconds": round(time.perf_counter() - start, 1),
            "verify_ms": table, "verify_time_relative_to_1_token": ratios,
            "fit_heldout_error": round(model_fit.heldout_error(samples), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--profile-budget", type=float, default=60.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks the GPU paths")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(report, flush=True)
    report["kernels"] = kernel_parity()
    print(report["kernels"], flush=True)
    report["exactness"] = []
    for dtype in ("float32", "bfloat16"):
        report["exactness"].append(exactness(dtype))
        print(report["exactness"][-1], flush=True)
    report["cost_regime"] = cost_regime(args.profile_budget)
    print(json.dumps(report["cost_regime"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
