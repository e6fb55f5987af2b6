"""Training-step throughput, fp32 against bf16 autocast, measured side by side.

CPUs differ: on AVX2-only parts bf16 autocast is emulated and slower than fp32; parts with
avx512_bf16 or AMX run bf16 matrix products natively. So the recipe's precision is chosen
from a measurement on the machine that trains, A and B interleaved and repeated.
"""
from __future__ import annotations

import statistics
import time

import torch

from specserve_ray.training.loop import TrainSpec, distill_loss, _autocast


def cpu_flags() -> list[str]:
    """The bf16/AMX-relevant CPU flags of this machine (Linux), empty elsewhere."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return sorted({f for f in line.split() if "bf16" in f or f.startswith("amx") or f in ("avx2", "avx512f")})


def measure(model, *, seq: int, batch: int, steps: int, repeats: int, device: str = "cpu",
            vocab: int = 4096, log=print) -> dict:
    """Tokens/s of full training steps (forward, backward, AdamW) per precision.

    Each repeat times `steps` steps of fp32 then of bf16 autocast after one untimed warm-up
    step each, so slow phases of a shared machine hit both."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def run(precision: str, n: int) -> float:
        spec = TrainSpec(tokens=1, seq=seq, batch=batch, device=device, precision=precision)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            with _autocast(spec):
                logits = model(input_ids=x[:, :-1]).logits
            loss, _ = distill_loss(logits, x[:, 1:], None, None, 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for r in range(repeats):
        for precision in ("fp32", "bf16"):
            run(precision, 1)
            seconds = run(precision, steps)
            rates[precision].append(batch * seq * steps / seconds)
            log(f"repeat {r} {precision}: {rates[precision][-1]:.0f} tok/s")
    out = {p: {"median_tok_s": round(statistics.median(v), 1), "min": round(min(v), 1),
               "max": round(max(v), 1)} for p, v in rates.items()}
    out["bf16_over_fp32"] = round(out["bf16"]["median_tok_s"] / out["fp32"]["median_tok_s"], 3)
    out.update(seq=seq, batch=batch, steps_per_repeat=steps, repeats=repeats, device=device,
               threads=torch.get_num_threads(), cpu_flags=cpu_flags())
    return out


def decode_step_ms(model, context: int = 128, repeats: int = 50) -> float:
    """Median batch-1 decode step at `context` tokens through the engine's runner, in ms
    (what serving pays; the recipe keeps target step / draft step >= 10)."""
    from specserve_ray.models.runner import ModelRunner

    runner = ModelRunner(model.eval(), max_seqs=1, max_model_len=context + 8)
    runner.add("s")
    with torch.no_grad():
        runner.forward(["s"], [list(range(5, 5 + context))], all_logits=False)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.forward(["s"], [[7]], all_logits=False)
            times.append(time.perf_counter() - t0)
            runner.truncate("s", context)
    return sorted(times)[len(times) // 2] * 1000
