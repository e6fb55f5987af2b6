"""Quality figures of a pair: held-out loss, greedy agreement, simulated tokens per step.

Pure model math (no engine, no Ray), so it runs on the GPU machine too. With greedy
decoding, the draft's k proposals from an agreed prefix are exactly its teacher-forced
argmaxes along the target's greedy output up to the first disagreement, so the tokens a
speculative step emits at depth k follow from one teacher-forced pass over that output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """[N] long: the texts' tokens, each followed by end-of-text."""
    ids: list[int] = []
    for i in range(0, len(texts), 256):  # batched: the Rust tokenizer spreads a batch over cores
        for row in tokenizer(texts[i:i + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def loss_and_agreement(target, draft, stream: torch.Tensor, seq: int = 128, windows: int = 200,
                       device: str = "cpu") -> dict:
    """Teacher-forced over evenly spaced windows of `stream` ([N]): each model's mean next-token
    loss and the fraction of positions where the two argmaxes agree (measure_pair's figures)."""
    step = max(seq, (stream.numel() - seq - 1) // windows)
    agree = total = 0
    losses: dict[str, list[float]] = {"target": [], "draft": []}
    for s in list(range(0, stream.numel() - seq - 1, step))[:windows]:
        x = stream[s:s + seq].unsqueeze(0).to(device)
        y = stream[s + 1:s + seq + 1].to(device)
        lt = target(input_ids=x).logits[0].float()
        ld = draft(input_ids=x).logits[0].float()
        agree += int((lt.argmax(-1) == ld.argmax(-1)).sum())
        total += seq
        losses["target"].append(F.cross_entropy(lt, y).item())
        losses["draft"].append(F.cross_entropy(ld, y).item())
    return {"agreement": agree / max(total, 1),
            "loss": {k: sum(v) / max(len(v), 1) for k, v in losses.items()}}


def prompts_from_texts(tokenizer, texts: list[str], count: int, prompt_tokens: int) -> list[list[int]]:
    """`count` prompts of exactly `prompt_tokens` tokens cut at line starts, deterministically."""
    files = [t for t in texts if len(t) > 4000]
    prompts, i = [], 0
    while len(prompts) < count and i < 50 * count + len(files):
        text = files[i % len(files)]
        start = text.find("\n", (len(text) // 3 + 997 * (i // len(files))) % max(1, len(text) - 2000))
        ids = tokenizer(text[start + 1:], add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        i += 1
    return prompts


def tokens_per_step(match: list[bool], k: int) -> float:
    """Mean tokens a greedy speculative step emits at depth k along one sequence, given
    match[t] = the draft's argmax at position t equals the target's token t."""
    i, steps, emitted, n = 0, 0, 0, len(match)
    while i < n:
        m = 0
        while m < k and i + m < n and match[i + m]:
            m += 1
        step = min(m + 1, n - i)  # m accepted draft tokens plus the target's own next token
        emitted += step
        steps += 1
        i += step
    return emitted / max(steps, 1)


@torch.no_grad()
def trajectory_agreement(target, draft, prompts: list[list[int]], new_tokens: int = 64,
                         ks: tuple[int, ...] = (1, 4, 8), device: str = "cpu", eos_id: int | None = None) -> dict:
    """Along the target's own greedy continuations of `prompts` (equal lengths): the draft's
    greedy agreement, and the simulated mean tokens per step at each k."""
    ids = torch.tensor(prompts, device=device)
    seqs = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=eos_id if eos_id is not None else 0)
    p = ids.size(1)
    logits = draft(input_ids=seqs[:, :-1]).logits
    proposed = logits[:, p - 1:].argmax(-1)  # draft's guess for each generated token
    match = (proposed == seqs[:, p:]).cpu()
    per_k = {str(k): round(sum(tokens_per_step(row.tolist(), k) for row in match) / len(match), 3)
             for k in ks}
    return {"agreement": round(match.float().mean().item(), 4), "tokens_per_step": per_k,
            "prompts": len(prompts), "new_tokens": new_tokens}
