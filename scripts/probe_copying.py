"""Does the target copy? The edit prompt set's premise, measured on the target alone.

    PYTHONPATH=. python scripts/probe_copying.py --prompts 8 --new-tokens 64

An edit prompt (bench/prompt_sets.py) is a held-out function, a blank line and the
function's first line again; a code model that copies continues with the function's body,
and prompt lookup (n-gram drafting) then proposes exactly what it emits. This script
greedily continues each edit prompt with the target (Hugging Face `generate`, fp32) and
reports, per prompt and over all: how much of the body its output reproduces before the
first difference (characters, and as a share of the shorter of the two), and the tokens
per call an n-gram drafter (the engine's own `propose`, n = 1..4) would emit along that
output at k = 4 and k = 16. If the target copies little, the n-gram drafter can only win on the target's own
repetitions, and no drafter or policy change can reach the edit set's goal.
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specserve_ray.bench.prompt_sets import edit_cases
from specserve_ray.config import EMBEDDED_PAIR_DIR
from specserve_ray.drafting.ngram import propose


def tokens_per_call(prompt: list[int], output: list[int], k: int) -> float:
    """Greedy speculative steps along `output` with n-gram proposals of up to k tokens."""
    seq, done, calls = list(prompt), 0, 0
    while done < len(output):
        draft, _ = propose(np.asarray(seq, np.int64), k, 1, 4)
        accepted = 0
        while accepted < len(draft) and done + accepted < len(output) \
                and draft[accepted] == output[done + accepted]:
            accepted += 1
        step = min(accepted + 1, len(output) - done)
        seq += output[done:done + step]
        done += step
        calls += 1
    return len(output) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(EMBEDDED_PAIR_DIR / "target"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = []
    for prompt, body in edit_cases(tokenizer, args.prompts):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens,
                                 do_sample=False)[0, len(prompt):].tolist()
        # Compared as text: the prompt tokenized the body in context, so its ids alone
        # may split differently.
        text = tokenizer.decode(out)
        prefix = next((i for i, (a, b) in enumerate(zip(text, body)) if a != b),
                      min(len(text), len(body)))
        rows.append({"prompt_tokens": len(prompt), "body_chars": len(body),
                     "copied_prefix_chars": prefix,
                     "copied_share": round(prefix / max(min(len(text), len(body)), 1), 3),
                     "ngram_tokens_per_call": {k: round(tokens_per_call(prompt, out, k), 2)
                                               for k in (4, 16)}})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"prompts": len(rows), "new_tokens": args.new_tokens,
               "copied_share_mean": round(statistics.mean(r["copied_share"] for r in rows), 3),
               "copied_prefix_chars_median": statistics.median(r["copied_prefix_chars"] for r in rows),
               "ngram_tokens_per_call_mean": {
                   k: round(statistics.mean(r["ngram_tokens_per_call"][k] for r in rows), 2)
                   for k in (4, 16)}}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "prompts": rows}, f, indent=1)


if __name__ == "__main__":
    main()
