"""Train the embedded draft/target pair from the Python standard library's source.

Recipe (fixed seed, CPU, fp32: the reference CPU has no native bf16, so autocast
would be emulated and slower):
  1. corpus: every stdlib ``*.py`` file except tests; the packages ``email``, ``http``
     and ``xml`` are held out for evaluation;
  2. a byte-level BPE tokenizer (vocab 4096) trained on the training split;
  3. the target, a Llama-shaped causal LM, trained on next-token loss;
  4. the draft, a much smaller Llama, distilled from the target: a mix of KL to the
     target's next-token distribution and plain next-token loss.
Both models are saved in Hugging Face format (config.json, safetensors in bf16,
tokenizer files) so ``AutoModelForCausalLM.from_pretrained(path)`` loads them.

    python scripts/train_pair.py --out specserve_ray/assets/tiny-pair

Stages can run alone (``--stage tokenizer|target|draft|report``) so a long stage can
be resumed. The measured figures go to ``<out>/TRAINING.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HELD_OUT_PACKAGES = ("email", "http", "xml")
SEED = 20261125
EOS = "<|endoftext|>"


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """Train and held-out source files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages", "__pycache__") for p in rel):
            continue
        if rel[0].startswith("lib2to3") or rel[0] == "turtledemo":
            continue
        (held if rel[0] in HELD_OUT_PACKAGES else train).append(path)
    return train, held


def read_texts(paths: list[Path]) -> list[str]:
    texts = []
    for p in paths:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def train_tokenizer(texts: list[str], out: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    fast.model_max_length = 2048
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def llama_config(vocab: int, hidden: int, layers: int, heads: int, inter: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def batches(stream: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    n = stream.numel() - seq - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen)
        chunk = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def held_out_loss(model, stream: torch.Tensor, seq: int, max_windows: int = 96) -> float:
    model.eval()
    losses = []
    step = max(seq, (stream.numel() - seq - 1) // max_windows)
    for s in range(0, stream.numel() - seq - 1, step)[:max_windows]:
        x = stream[s : s + seq].unsqueeze(0)
        y = stream[s + 1 : s + seq + 1].unsqueeze(0)
        logits = model(input_ids=x).logits
        losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def train_loop(model, stream, *, minutes, seq, batch, lr, warmup, teacher=None, kl_weight=0.0,
               eval_stream=None, log_every=20):
    """Train for a wall-clock budget; the schedule is set from a measured step time."""
    gen = torch.Generator().manual_seed(SEED)
    it = batches(stream, seq, batch, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    budget = minutes * 60.0
    start = time.time()
    step, total_steps, tokens, last_loss = 0, None, 0, float("nan")
    ema = None
    while True:
        elapsed = time.time() - start
        if total_steps is None and step == 10:
            # Fix the cosine schedule's length from the first steps' pace.
            total_steps = max(20, int(budget / (elapsed / 10)))
        if total_steps is not None and step >= total_steps:
            break
        x, y = next(it)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps or 10**6, lr, warmup)
        logits = model(input_ids=x).logits
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=x).logits
            kl = F.kl_div(
                F.log_softmax(logits, -1).view(-1, logits.size(-1)),
                F.log_softmax(teacher_logits, -1).view(-1, logits.size(-1)),
                log_target=True,
                reduction="batchmean",
            )
            loss = kl_weight * kl + (1 - kl_weight) * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        last_loss = ce.item()
        ema = last_loss if ema is None else 0.95 * ema + 0.05 * last_loss
        if step % log_every == 0:
            rate = tokens / (time.time() - start)
            print(f"step {step}/{total_steps} ce {last_loss:.3f} (ema {ema:.3f}) "
                  f"{rate:.0f} tok/s {time.time() - start:.0f}s", flush=True)
    result = {"steps": step, "tokens": tokens, "seconds": round(time.time() - start, 1),
              "train_loss_ema": round(ema, 4)}
    if eval_stream is not None:
        result["held_out_loss"] = round(held_out_loss(model, eval_stream, seq), 4)
    return result


def save_model(model, tokenizer, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.config.torch_dtype = "bfloat16"
    tokenizer.save_pretrained(out)
    model.float()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("specserve_ray/assets/tiny-pair"))
    ap.add_argument("--stage", choices=["all", "tokenizer", "target", "draft"], default="all")
    ap.add_argument("--target-minutes", type=float, default=22.0)
    ap.add_argument("--draft-minutes", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    train_files, held_files = stdlib_files()
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    tok_dir = args.out / "tokenizer"
    report_path = args.out / "TRAINING.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}

    if args.stage in ("all", "tokenizer"):
        tokenizer = train_tokenizer(train_texts, tok_dir, vocab_size=4096)
        report["corpus"] = {"train_files": len(train_texts), "held_out_files": len(held_texts),
                            "held_out_packages": list(HELD_OUT_PACKAGES)}
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_ids = token_stream(tokenizer, train_texts)
    held_ids = token_stream(tokenizer, held_texts)
    report.setdefault("corpus", {}).update(train_tokens=train_ids.numel(), held_out_tokens=held_ids.numel())
    print(f"train tokens {train_ids.numel()}, held-out tokens {held_ids.numel()}", flush=True)

    if args.stage in ("all", "target"):
        cfg = llama_config(len(tokenizer), hidden=512, layers=8, heads=8, inter=1376,
                           eos_id=tokenizer.eos_token_id)
        target = LlamaForCausalLM(cfg)
        n_params = sum(p.numel() for p in target.parameters())
        print(f"target params {n_params / 1e6:.1f}M", flush=True)
        res = train_loop(target, train_ids, minutes=args.target_minutes, seq=128, batch=24,
                         lr=2e-3, warmup=40, eval_stream=held_ids)
        res["params"] = n_params
        report["target"] = res
        save_model(target, tokenizer, args.out / "target")
        report_path.write_text(json.dumps(report, indent=2))
        print("target", res, flush=True)

    if args.stage in ("all", "draft"):
        teacher = AutoModelForCausalLM.from_pretrained(args.out / "target", dtype=torch.float32)
        teacher.eval()
        cfg = llama_config(len(tokenizer), hidden=128, layers=1, heads=2, inter=384,
                           eos_id=tokenizer.eos_token_id)
        draft = LlamaForCausalLM(cfg)
        n_params = sum(p.numel() for p in draft.parameters())
        print(f"draft params {n_params / 1e6:.2f}M", flush=True)
        res = train_loop(draft, train_ids, minutes=args.draft_minutes, seq=128, batch=24,
                         lr=3e-3, warmup=40, teacher=teacher, kl_weight=0.8, eval_stream=held_ids)
        res["params"] = n_params
        res["kl_weight"] = 0.8
        report["draft"] = res
        save_model(draft, tokenizer, args.out / "draft")
        report_path.write_text(json.dumps(report, indent=2))
        print("draft", res, flush=True)

    report_path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
