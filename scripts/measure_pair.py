"""Measure the embedded pair: sizes, held-out loss, draft/target agreement, step costs.

    python scripts/measure_pair.py [--pair specserve_ray/assets/tiny-pair]

Agreement is greedy per-token agreement under teacher forcing: over held-out source
(the stdlib packages email/, http/, xml/, never trained on), the fraction of positions
where the draft's argmax equals the target's argmax. Step costs are medians of a batch-1
decode step at a 128-token context through the engine's runner (what serving pays).
Results are merged into <pair>/TRAINING.json under "measured".

`--corpus runs/pair-corpus/corpus.jsonl.xz` reads the held-out files from the training
recipe's pack instead of this Python's stdlib (the same bytes on a GPU machine whose Python
differs) and adds agreement on the held-out packages' code and along the target's own greedy
output with simulated tokens per step. `--device cuda --no-step-costs` measures quality on
a GPU machine (step costs are this project's CPU figures and need the engine installed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specserve_ray.prompts import held_out_files
from specserve_ray.training.evaluate import (loss_and_agreement, prompts_from_texts, token_stream,
                                             trajectory_agreement)
from specserve_ray.training.throughput import decode_step_ms as step_ms


def held_out_stream(tokenizer) -> torch.Tensor:
    ids = []
    for f in held_out_files():
        ids.extend(tokenizer(f.read_text(encoding="utf-8", errors="replace"),
                             add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids)


@torch.no_grad()
def agreement_and_loss(target, draft, stream, seq=128, windows=200, device="cpu"):
    r = loss_and_agreement(target, draft, stream, seq=seq, windows=windows, device=device)
    return r["agreement"], r["loss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", type=Path, default=Path("specserve_ray/assets/tiny-pair"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corpus", type=Path, default=None, help="held-out text from this training pack")
    ap.add_argument("--no-step-costs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    tok = AutoTokenizer.from_pretrained(args.pair / "target")
    target = AutoModelForCausalLM.from_pretrained(args.pair / "target", dtype=torch.float32).to(dev).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.pair / "draft", dtype=torch.float32).to(dev).eval()
    extra = {}
    if args.corpus is not None:
        from specserve_ray.training.corpus import read_pack
        splits = read_pack(args.corpus)
        held_texts = [t for _, t in splits["held_stdlib"]]
        stream = token_stream(tok, held_texts)
        if splits.get("held_pkg"):
            pkg_agree, pkg_losses = agreement_and_loss(
                target, draft, token_stream(tok, [t for _, t in splits["held_pkg"]]), device=dev)
            extra["held_out_package"] = {"greedy_agreement": round(pkg_agree, 4),
                                         "loss": {k: round(v, 4) for k, v in pkg_losses.items()},
                                         "packages": sorted({s for s, _ in splits["held_pkg"]})}
        prompts = prompts_from_texts(tok, held_texts, 32, 48)
        extra["along_target_greedy"] = trajectory_agreement(target, draft, prompts, new_tokens=64,
                                                            device=dev, eos_id=tok.eos_token_id)
    else:
        stream = held_out_stream(tok)
    agree, losses = agreement_and_loss(target, draft, stream, device=dev)
    costs = {}
    if not args.no_step_costs:
        target, draft = target.cpu(), draft.cpu()
        target_bf16 = AutoModelForCausalLM.from_pretrained(args.pair / "target", dtype=torch.bfloat16).eval()
        costs = {"target_fp32_ms": step_ms(target), "target_bf16_ms": step_ms(target_bf16),
                 "draft_fp32_ms": step_ms(draft)}
    sizes = {d: sum(f.stat().st_size for f in (args.pair / d).iterdir()) / 2**20
             for d in ("target", "draft")}
    measured = {
        "greedy_agreement_held_out": round(agree, 4),
        "held_out_loss_fp32": {k: round(v, 4) for k, v in losses.items()},
        **extra,
        "size_mib": {k: round(v, 2) for k, v in sizes.items()},
        "params": {"target": sum(p.numel() for p in target.parameters()),
                   "draft": sum(p.numel() for p in draft.parameters())},
        "threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "device": dev, "command": "python scripts/measure_pair.py " + " ".join(sys.argv[1:]),
    }
    if costs:
        measured["step_ms_batch1_ctx128"] = {k: round(v, 3) for k, v in costs.items()}
        measured["target_over_draft_step"] = round(costs["target_fp32_ms"] / costs["draft_fp32_ms"], 2)
    path = args.pair / "TRAINING.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["measured"] = measured
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(measured, indent=2))


if __name__ == "__main__":
    main()
