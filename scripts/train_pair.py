"""Train the embedded draft/target pair (the recipe; modules in specserve_ray/training/).

Stages, each runnable alone (`--stage NAME`), in this order for `--stage all`:
  corpus      pack the training text: stdlib source (email/, http/, xml/ held out) plus,
              unless --no-packages, the pinned permissively licensed packages of this
              install (rich/, click/ held out) -> runs/pair-corpus/corpus.jsonl.xz
  target      next-token training of the target (Llama, 27.4M by default)
  generate    sequences written by the target (greedy and sampled) for distillation
  draft       the draft distilled on them: KL to the target + next-token loss, mixed
              with library text
  eval        held-out loss on the stdlib held-out files (today's 4.84 is measured on the
              same files), agreement on held-out stdlib and package code, agreement and
              simulated tokens per step along the target's greedy output
  throughput  (not in `all`) fp32 vs bf16 autocast training tokens/s for the target shape

Fixed seed, schedule by token count, checkpoints every --ckpt-every steps in --work;
`--resume` continues a stopped stage. The shared tokenizer is the committed pair's
(held-out losses stay comparable); `--new-tokenizer` trains a fresh one instead.

    python scripts/train_pair.py --preset cpu  --out runs/pair-next          # this CPU
    python scripts/train_pair.py --preset gpu  --device cuda --out $OUT/pair # a lent GPU
    python scripts/train_pair.py --preset smoke --out /tmp/pair-smoke        # minutes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specserve_ray.training import corpus as corpus_mod  # noqa: E402
from specserve_ray.training.distill import generate_sequences, mixed_batches  # noqa: E402
from specserve_ray.training.evaluate import (loss_and_agreement, prompts_from_texts,  # noqa: E402
                                             token_stream, trajectory_agreement)
from specserve_ray.training.loop import SEED, TrainSpec, stream_batches, train  # noqa: E402

COMMITTED_TOKENIZER = ROOT / "specserve_ray/assets/tiny-pair/target"
# Token counts and batch shapes per preset; any flag given explicitly wins.
PRESETS = {
    "smoke": dict(target_shape="64,2,2,128", draft_shape="32,1,1,64", target_tokens=8192,
                  target_seq=64, target_batch=8, gen_count=16, gen_prompt=16, gen_new=16,
                  gen_batch=8, draft_tokens=4096, draft_batch=8, eval_windows=8, eval_prompts=4,
                  eval_new=16, ckpt_every=2, warmup=2),
    "cpu": dict(target_tokens=6_000_000, target_seq=256, target_batch=16, gen_count=4096,
                gen_prompt=64, gen_new=192, gen_batch=64, draft_tokens=8_000_000, draft_batch=32,
                gen_fraction=0.6),
    "gpu": dict(target_tokens=48_000_000, target_seq=256, target_batch=128, gen_count=16384,
                gen_prompt=64, gen_new=192, gen_batch=1024, draft_tokens=24_000_000, draft_batch=128),
}
DEFAULTS = dict(target_shape="512,8,8,1376", draft_shape="192,1,3,512", target_tokens=6_000_000,
                target_seq=256, target_batch=16, target_lr=2e-3, gen_count=2048, gen_prompt=64,
                gen_new=192, gen_batch=64, gen_greedy=0.5, draft_tokens=3_000_000, draft_batch=32,
                draft_lr=3e-3, kl_weight=0.8, gen_fraction=0.75, copy_fraction=0.0, eval_windows=200, eval_prompts=32,
                eval_new=64, ckpt_every=200, warmup=100)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all",
                    choices=["all", "corpus", "target", "generate", "draft", "eval", "throughput"])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/pair-next", help="pair folder written")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints and generated data "
                    "(default: <out>/../<out name>-work)")
    ap.add_argument("--corpus", type=Path, default=ROOT / "runs/pair-corpus/corpus.jsonl.xz")
    ap.add_argument("--no-packages", action="store_true", help="stdlib only (the committed recipe)")
    ap.add_argument("--tokenizer", type=Path, default=COMMITTED_TOKENIZER)
    ap.add_argument("--new-tokenizer", action="store_true", help="train a BPE-4096 tokenizer on the corpus")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 autocast on CUDA and on CPUs with avx512_bf16/AMX, else fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="per training stage; then checkpoint and stop")
    ap.add_argument("--target-fit-minutes", type=float, default=0.0,
                    help="cut the target's token count to what fits this long at the measured pace")
    ap.add_argument("--draft-fit-minutes", type=float, default=0.0)
    for key, value in DEFAULTS.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    ap.add_argument("--throughput-steps", type=int, default=2)
    ap.add_argument("--throughput-repeats", type=int, default=3)
    ap.add_argument("--step-shapes", default="", help="throughput: also time batch-1 decode steps of "
                    "these shapes, 'h,l,heads,mlp;...'")
    args = ap.parse_args(argv)
    merged = {**DEFAULTS, **PRESETS.get(args.preset or "", {})}
    for key, value in merged.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.work is None:
        args.work = args.out.parent / (args.out.name + "-work")
    if args.precision == "auto":
        from specserve_ray.training.throughput import cpu_flags
        native = any(f in ("avx512_bf16", "amx_bf16") for f in cpu_flags())
        args.precision = "bf16" if args.device.startswith("cuda") or native else "fp32"
    return args


def llama(vocab: int, shape: str, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, inter = (int(v) for v in shape.split(","))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def load(path: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu")
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.float()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    for line in open("/proc/cpuinfo") if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


class Pair:
    """Shared state of a run: tokenizer, token streams (cached in --work), the report."""

    def __init__(self, args):
        self.args = args
        args.work.mkdir(parents=True, exist_ok=True)
        args.out.mkdir(parents=True, exist_ok=True)
        self.report_path = args.out / "TRAINING.json"
        self.report = json.loads(self.report_path.read_text()) if self.report_path.exists() else {}
        self._tok = self._streams = None

    def save_report(self):
        self.report_path.write_text(json.dumps(self.report, indent=2))

    @property
    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer
            self._tok = AutoTokenizer.from_pretrained(self.args.tokenizer)
        return self._tok

    @property
    def streams(self) -> dict[str, torch.Tensor]:
        if self._streams is None:
            cache = self.args.work / "streams.pt"  # not beside the pack: that folder is carried
            key = [str(self.args.corpus), self.args.corpus.stat().st_mtime_ns, str(self.args.tokenizer)]
            if cache.exists() and (cached := torch.load(cache))["key"] == key:
                self._streams = cached["streams"]
            else:
                splits = corpus_mod.read_pack(self.args.corpus)
                self._streams = {s: token_stream(self.tokenizer, [t for _, t in recs]).to(torch.int32)
                                 for s, recs in splits.items()}
                torch.save({"key": key, "streams": self._streams}, cache)
            manifest = self.args.corpus.with_name("manifest.json")
            if manifest.exists():
                self.report["corpus"] = json.loads(manifest.read_text())
            self.report.setdefault("corpus", {})["tokens"] = {s: int(v.numel()) for s, v in self._streams.items()}
        return self._streams

    def texts(self, split: str) -> list[str]:
        return [t for _, t in corpus_mod.read_pack(self.args.corpus).get(split, [])]

    def stream(self, split: str) -> torch.Tensor:
        return self.streams[split].long().to(self.args.device)


def stage_corpus(p: Pair):
    a = p.args
    manifest = corpus_mod.build_pack(a.corpus, packages=not a.no_packages)
    p.report["corpus"] = {"pack": str(a.corpus), **manifest}
    # Beside the pack, so a run elsewhere (the GPU) records which sources and licences it saw.
    a.corpus.with_name("manifest.json").write_text(json.dumps(p.report["corpus"], indent=1))
    if a.new_tokenizer:
        from specserve_ray.training.tokenizer import train_tokenizer
        train_tokenizer(p.texts("train"), a.work / "tokenizer", vocab_size=4096)
        a.tokenizer = a.work / "tokenizer"
    print(json.dumps(manifest, indent=1), flush=True)


def spec_for(p: Pair, role: str) -> TrainSpec:
    a = p.args
    if role == "target":
        return TrainSpec(tokens=a.target_tokens, seq=a.target_seq, batch=a.target_batch, lr=a.target_lr,
                         warmup=a.warmup, copy_fraction=a.copy_fraction, device=a.device,
                         precision=a.precision, seed=a.seed,
                         ckpt_every=a.ckpt_every, max_minutes=a.max_minutes,
                         fit_minutes=a.target_fit_minutes)
    return TrainSpec(tokens=a.draft_tokens, seq=a.gen_prompt + a.gen_new - 1, batch=a.draft_batch,
                     lr=a.draft_lr, warmup=a.warmup, kl_weight=a.kl_weight, device=a.device,
                     precision=a.precision, seed=a.seed + 1, ckpt_every=a.ckpt_every,
                     max_minutes=a.max_minutes, fit_minutes=a.draft_fit_minutes)


def stage_target(p: Pair):
    a = p.args
    torch.manual_seed(a.seed)
    model = llama(len(p.tokenizer), a.target_shape, p.tokenizer.eos_token_id)
    spec = spec_for(p, "target")
    # --copy-fraction: rows that show a span twice, so the target learns to copy (loop.py).
    separator = torch.tensor(p.tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    batches = stream_batches(p.stream("train"), spec.seq, spec.batch, spec.seed,
                             spec.copy_fraction, separator)
    res = train(model, batches, spec, ckpt=a.work / "target.ckpt", resume=a.resume)
    res.update(shape=a.target_shape, params=sum(t.numel() for t in model.parameters()),
               copy_fraction=spec.copy_fraction)
    p.report["target"] = res
    if res["done"]:
        save(model, p.tokenizer, a.out / "target")
    return res["done"]


def stage_generate(p: Pair):
    a = p.args
    target = load(a.out / "target", a.device)
    dtype = torch.bfloat16 if a.precision == "bf16" and a.device.startswith("cuda") else torch.float32
    gen = generate_sequences(target, p.stream("train"), count=a.gen_count, prompt_len=a.gen_prompt,
                             new_tokens=a.gen_new, batch=a.gen_batch, greedy_fraction=a.gen_greedy,
                             eos_id=p.tokenizer.eos_token_id, seed=a.seed + 2, device=a.device, dtype=dtype)
    torch.save(gen, a.work / "generated.pt")
    p.report["generate"] = {"sequences": a.gen_count, "prompt_tokens": a.gen_prompt,
                            "new_tokens": a.gen_new, "greedy_fraction": a.gen_greedy,
                            "generated_tokens": gen["tokens"], "seconds": gen["seconds"],
                            "dtype": str(dtype).replace("torch.", "")}
    return True


def stage_draft(p: Pair):
    a = p.args
    teacher = load(a.out / "target", a.device)
    generated = torch.load(a.work / "generated.pt")
    torch.manual_seed(a.seed + 1)
    draft = llama(len(p.tokenizer), a.draft_shape, p.tokenizer.eos_token_id)
    spec = spec_for(p, "draft")
    batches = mixed_batches(generated, p.stream("train"), spec.batch, a.gen_fraction, spec.seed, a.device)
    res = train(draft, batches, spec, teacher=teacher, ckpt=a.work / "draft.ckpt", resume=a.resume)
    res.update(shape=a.draft_shape, params=sum(t.numel() for t in draft.parameters()),
               gen_fraction=a.gen_fraction)
    p.report["draft"] = res
    if res["done"]:
        save(draft, p.tokenizer, a.out / "draft")
    return res["done"]


def stage_eval(p: Pair):
    a = p.args
    target, draft = load(a.out / "target", a.device), load(a.out / "draft", a.device)
    held = loss_and_agreement(target, draft, p.streams["held_stdlib"].long(), windows=a.eval_windows,
                              device=a.device)
    out = {"held_out_stdlib": {"agreement": round(held["agreement"], 4),
                               "loss": {k: round(v, 4) for k, v in held["loss"].items()},
                               "files": "stdlib email/ http/ xml/ (the committed pair's 4.84 set)"}}
    if "held_pkg" in p.streams:
        pkg = loss_and_agreement(target, draft, p.streams["held_pkg"].long(), windows=a.eval_windows,
                                 device=a.device)
        out["held_out_package"] = {"agreement": round(pkg["agreement"], 4),
                                   "loss": {k: round(v, 4) for k, v in pkg["loss"].items()},
                                   "packages": sorted(corpus_mod.HELD_OUT_PACKAGES)}
    prompts = prompts_from_texts(p.tokenizer, p.texts("held_stdlib"), a.eval_prompts, 48)
    out["along_target_greedy"] = trajectory_agreement(target, draft, prompts, new_tokens=a.eval_new,
                                                      device=a.device, eos_id=p.tokenizer.eos_token_id)
    p.report["eval"] = out
    print(json.dumps(out, indent=1), flush=True)
    return True


def stage_throughput(p: Pair):
    from specserve_ray.training.throughput import decode_step_ms, measure

    a = p.args
    torch.manual_seed(a.seed)
    model = llama(len(p.tokenizer), a.target_shape, p.tokenizer.eos_token_id)
    res = measure(model, seq=a.target_seq, batch=a.target_batch, steps=a.throughput_steps,
                  repeats=a.throughput_repeats, device=a.device, vocab=len(p.tokenizer))
    res["shape"] = a.target_shape
    if a.device == "cpu" and a.step_shapes:
        # Serving cost at batch 1 of candidate shapes (random weights time the same).
        steps = {}
        for shape in a.step_shapes.split(";"):
            torch.manual_seed(a.seed)
            steps[shape] = round(decode_step_ms(llama(len(p.tokenizer), shape, p.tokenizer.eos_token_id).float()), 3)
            print(f"decode step {shape}: {steps[shape]} ms", flush=True)
        res["decode_step_ms_batch1_ctx128"] = steps
    p.report.setdefault("throughput", []).append(res)
    print(json.dumps(res, indent=1), flush=True)
    return True


STAGES = {"corpus": stage_corpus, "target": stage_target, "generate": stage_generate,
          "draft": stage_draft, "eval": stage_eval, "throughput": stage_throughput}


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    p = Pair(a)
    p.report["run"] = {"device": a.device, "machine": machine(a.device), "precision": a.precision,
                       "threads": a.threads if a.device == "cpu" else None, "seed": a.seed,
                       "torch": torch.__version__, "python": platform.python_version(),
                       "preset": a.preset, "command": "python scripts/train_pair.py " + " ".join(sys.argv[1:])}
    import transformers
    p.report["run"]["transformers"] = transformers.__version__
    names = ["target", "generate", "draft", "eval"] if a.stage == "all" else [a.stage]
    if a.stage == "all" and not a.corpus.exists():
        names.insert(0, "corpus")
    t0 = time.time()
    for name in names:
        print(f"== stage {name}", flush=True)
        done = STAGES[name](p)
        p.report.setdefault("stage_seconds", {})[name] = round(time.time() - t0, 1)
        t0 = time.time()
        p.save_report()
        if done is False:
            print(f"stage {name} stopped before its end (time cap); rerun with --resume", flush=True)
            return 3
    p.save_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
