"""Resumable training loop for the pair: next-token loss, optionally distillation from a teacher.

The schedule is fixed by a token count (not wall clock), batches are drawn from a generator
seeded by (seed, step), and a checkpoint holds model, optimizer, step and timing: a run
stopped at any checkpoint and resumed produces the same batches and the same schedule as
an uninterrupted one. fp32 master weights always; `precision="bf16"` runs forward and
backward under bf16 autocast (on CPUs with avx512_bf16/AMX, and on GPUs).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

SEED = 20261125


@dataclass
class TrainSpec:
    tokens: int                 # total training tokens (sets the step count)
    seq: int = 256
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    kl_weight: float = 0.0      # > 0 with a teacher: kl_weight * KL + (1 - kl_weight) * CE
    copy_fraction: float = 0.0  # share of rows showing a span twice (stream_batches)
    device: str = "cpu"
    precision: str = "fp32"     # fp32 | bf16 (autocast)
    seed: int = SEED
    ckpt_every: int = 200
    log_every: int = 20
    max_minutes: float = 0.0    # > 0: stop (after a checkpoint) when exceeded; --resume continues
    fit_minutes: float = 0.0    # > 0: after a few warm-up steps, cut `tokens` to what fits this
                                # long at the measured pace (a lent GPU's fixed time); recorded

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.seq * self.batch)))


# step -> (inputs [B, T], labels [B, T], loss mask [B, T] or None), on the spec's device
BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_generator(seed: int, step: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)


def stream_batches(stream: torch.Tensor, seq: int, batch: int, seed: int,
                   copy_fraction: float = 0.0, separator: torch.Tensor | None = None) -> BatchFn:
    """Random windows of a token stream ([N] long tensor, on the training device).

    With `copy_fraction` > 0 that share of the rows shows a span twice: half a row of
    text, `separator` ([S] ids), then the same text again from a random offset in its
    first quarter, running on past the span's end. Past its first token the repeat is
    predictable only by finding where the current tokens occurred before (an induction
    copy), the skill an edit (a function shown, then its first line again) and prompt
    lookup rely on, which a small model does not pick up from plain text alone. Rows with
    copies come first in the batch; the batch (and so the schedule) is unchanged in size.
    """
    n = stream.numel() - seq - 1
    offsets = torch.arange(seq + 1, device=stream.device)
    n_copy = int(round(batch * copy_fraction)) if separator is not None else 0
    sep = separator.to(stream.device) if separator is not None else None
    half = (seq + 1 - (sep.numel() if sep is not None else 0)) // 2
    tail = seq + 1 - half - (sep.numel() if sep is not None else 0)

    def fn(step: int):
        g = step_generator(seed, step)
        starts = torch.randint(0, n, (batch,), generator=g).to(stream.device)
        chunk = stream[starts[:, None] + offsets]
        if n_copy:
            shift = torch.randint(0, max(1, half // 4), (n_copy,), generator=g).to(stream.device)
            first = stream[starts[:n_copy, None] + offsets[:half]]
            again = stream[(starts[:n_copy] + shift)[:, None] + offsets[:tail]]
            chunk = chunk.clone()
            chunk[:n_copy] = torch.cat([first, sep.expand(n_copy, -1), again], dim=1)
        return chunk[:, :-1], chunk[:, 1:], None
    return fn


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                 teacher_logits: torch.Tensor | None, kl_weight: float):
    """(loss, ce). logits/teacher_logits [B, T, V]; labels [B, T]; mask [B, T] bool or None.

    KL(teacher || student) per position, averaged over unmasked positions, in fp32."""
    logp = F.log_softmax(logits.float(), -1)
    ce_pos = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    weight = torch.ones_like(ce_pos) if mask is None else mask.to(ce_pos.dtype)
    denom = weight.sum().clamp(min=1.0)
    ce = (ce_pos * weight).sum() / denom
    if teacher_logits is None or kl_weight == 0.0:
        return ce, ce
    logq = F.log_softmax(teacher_logits.float(), -1)
    kl_pos = (logq.exp() * (logq - logp)).sum(-1)
    kl = (kl_pos * weight).sum() / denom
    return kl_weight * kl + (1 - kl_weight) * ce, ce


def _autocast(spec: TrainSpec):
    dev = "cuda" if spec.device.startswith("cuda") else "cpu"
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=spec.precision == "bf16")


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-save leaves the previous checkpoint


def train(model, batch_fn: BatchFn, spec: TrainSpec, *, teacher=None, ckpt: Path | None = None,
          resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train `model` in place; returns steps, tokens, seconds, train loss EMA, done flag."""
    model.to(spec.device).train()
    fused = spec.device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=fused or None)
    step, tokens, seconds, ema = 0, 0, 0.0, None
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=spec.device, weights_only=False)
        saved = state["spec"]
        for key in ("tokens", "seq", "batch", "lr", "warmup", "kl_weight", "seed", "copy_fraction"):
            if saved.get(key, 0.0) != getattr(spec, key):
                raise SystemExit(f"--resume: checkpoint {ckpt} has {key}={saved[key]}, "
                                 f"this run asks {getattr(spec, key)}; drop --resume to restart")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, tokens, seconds, ema = state["step"], state["tokens"], state["seconds"], state["ema"]
        log(f"resumed at step {step}/{spec.steps} ({tokens} tokens, {seconds:.0f}s)")
    if teacher is not None:
        teacher.to(spec.device).eval()
    total = spec.steps
    start = time.time() - seconds
    run_start, run_tokens = time.time(), 0

    def checkpoint():
        if ckpt is not None:
            _save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                         "tokens": tokens, "seconds": time.time() - start, "ema": ema,
                         "spec": asdict(spec)})

    probe = min(20, max(2, spec.warmup // 2))
    probe_start = None
    while step < total:
        if spec.fit_minutes > 0 and not resume:
            if step == 2:
                probe_start = (time.time(), tokens)  # after the first steps' one-off costs
            elif step == probe and probe_start is not None:
                # Decided inside warm-up, so the run equals one started with the cut count.
                rate = (tokens - probe_start[1]) / max(time.time() - probe_start[0], 1e-9)
                fit = int(rate * (spec.fit_minutes * 60 - (time.time() - run_start)))
                if fit + tokens < spec.tokens:
                    spec.tokens = max(fit + tokens, (probe + 1) * spec.seq * spec.batch)
                    total = spec.steps
                    log(f"fit to {spec.fit_minutes} min at {rate:.0f} tok/s: {spec.tokens} tokens, {total} steps")
        x, y, mask = batch_fn(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, spec.lr, spec.warmup)
        with _autocast(spec):
            logits = model(input_ids=x).logits
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=x).logits
        loss, ce = distill_loss(logits, y, mask, teacher_logits, spec.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        run_tokens += x.numel()
        ce_value = ce.item()
        ema = ce_value if ema is None else 0.95 * ema + 0.05 * ce_value
        if step % spec.log_every == 0 or step == total:
            rate = run_tokens / max(time.time() - run_start, 1e-9)
            log(f"step {step}/{total} ce {ce_value:.3f} (ema {ema:.3f}) {rate:.0f} tok/s "
                f"{time.time() - start:.0f}s")
        if step % spec.ckpt_every == 0:
            checkpoint()
        if spec.max_minutes > 0 and time.time() - run_start > spec.max_minutes * 60 and step < total:
            checkpoint()
            log(f"time cap reached at step {step}/{total}; rerun with --resume to continue")
            break
    if step == total:
        checkpoint()
    elapsed = time.time() - start
    return {"steps": step, "planned_steps": total, "planned_tokens": spec.tokens, "tokens": tokens, "seconds": round(elapsed, 1),
            "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
            "train_loss_ema": round(ema, 4) if ema is not None else None, "done": step == total,
            "device": spec.device, "precision": spec.precision, "seq": spec.seq, "batch": spec.batch,
            "lr": spec.lr, "kl_weight": spec.kl_weight}
