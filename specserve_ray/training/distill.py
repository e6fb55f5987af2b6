"""Sequence-level distillation data: what the target itself writes, for the draft to learn.

Serving asks the draft to predict the target along the target's own output, not along
library text. So the target continues prompts cut from the training files, greedily and by
sampling at temperature 1 (the distribution sampled requests see), in batches; the draft
then trains on those sequences against the target's full distributions (KL) plus the
next-token loss, mixed with ordinary library text so it keeps the prompt side right.
"""
from __future__ import annotations

import time

import torch

from specserve_ray.training.loop import BatchFn, step_generator


@torch.no_grad()
def generate_sequences(target, stream: torch.Tensor, *, count: int, prompt_len: int, new_tokens: int,
                       batch: int, greedy_fraction: float, eos_id: int, seed: int, device: str,
                       dtype: torch.dtype = torch.float32, log=print) -> dict:
    """`count` sequences of prompt_len + new_tokens tokens from the target.

    stream: [N] training tokens (prompts are random windows of it). Returns {"seqs" [count, L]
    long (cpu), "greedy" [count] bool, "loss_mask" [count, L - 1] bool: False for labels after
    a generated end-of-text}, plus timing."""
    model = target.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - prompt_len - 1, (count,), generator=gen)
    prompts = stream.cpu()[starts[:, None] + torch.arange(prompt_len)]
    greedy = torch.arange(count) < greedy_count(count, batch, greedy_fraction)
    out, t0 = [], time.time()
    for i in range(0, count, batch):
        ids = prompts[i:i + batch].to(device)
        # A batch is all greedy or all sampled (the greedy share is rounded to whole batches).
        sampling = {"do_sample": False} if bool(greedy[i]) else {"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                 "top_p": 1.0}
        torch.manual_seed(seed + i)
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             pad_token_id=eos_id, **sampling)
        if seq.size(1) < prompt_len + new_tokens:  # every row ended early: pad with EOS
            pad = torch.full((seq.size(0), prompt_len + new_tokens - seq.size(1)), eos_id,
                             dtype=seq.dtype, device=seq.device)
            seq = torch.cat([seq, pad], 1)
        out.append(seq.cpu())
        log(f"generated {min(i + batch, count)}/{count} sequences ({time.time() - t0:.0f}s)")
    seqs = torch.cat(out)
    gen_part = seqs[:, prompt_len:]
    is_eos = gen_part == eos_id
    # Labels are seqs[:, 1:]; a label after the first generated EOS is padding, not text.
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    loss_mask = torch.ones(count, seqs.size(1) - 1, dtype=torch.bool)
    loss_mask[:, prompt_len - 1:] = ~after_eos
    return {"seqs": seqs, "greedy": greedy, "loss_mask": loss_mask, "prompt_len": prompt_len,
            "seconds": round(time.time() - t0, 1), "tokens": int(count * new_tokens)}


def greedy_count(count: int, batch: int, fraction: float) -> int:
    """Round the greedy share to whole batches so a batch is all greedy or all sampled."""
    return int(round(count * fraction / batch)) * batch


def mixed_batches(generated: dict, stream: torch.Tensor, batch: int, gen_fraction: float,
                  seed: int, device: str) -> BatchFn:
    """Draft batches: `gen_fraction` of rows from generated sequences, the rest library text
    windows of the same length (stream [N] on any device)."""
    seqs = generated["seqs"].to(device)
    mask = generated["loss_mask"].to(device)
    length = seqs.size(1)
    n_gen = max(1, int(round(batch * gen_fraction))) if gen_fraction > 0 else 0
    n_text = batch - n_gen
    offsets = torch.arange(length, device=stream.device)

    def fn(step: int):
        g = step_generator(seed, step)
        rows_x, rows_y, rows_m = [], [], []
        if n_gen:
            pick = torch.randint(0, seqs.size(0), (n_gen,), generator=g).to(device)
            s = seqs[pick]
            rows_x.append(s[:, :-1]); rows_y.append(s[:, 1:]); rows_m.append(mask[pick])
        if n_text:
            starts = torch.randint(0, stream.numel() - length, (n_text,), generator=g).to(stream.device)
            s = stream[starts[:, None] + offsets].to(device)
            rows_x.append(s[:, :-1]); rows_y.append(s[:, 1:])
            rows_m.append(torch.ones(n_text, length - 1, dtype=torch.bool, device=device))
        return torch.cat(rows_x), torch.cat(rows_y), torch.cat(rows_m)
    return fn
