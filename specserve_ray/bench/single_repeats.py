"""`bench single --repeats N`: the headline A/B of `bench single` again, N times, paired.

The main run picks the best configuration (drafter, k) and Hugging Face's best assisted
setting once; this re-times just the contenders of the key ratios on the main prompt
set, interleaved (each repeat runs all of them, every other repeat in reverse order, so
drift and warm caches hit both sides), and reports each ratio's median and range over
the repeats. The single-run keys of the report stay as they were.
"""
from __future__ import annotations

from specserve_ray.bench.deploy import spread


def _hf_setting(key: str | None) -> tuple[int | None, float | None, bool]:
    """'n=5,threshold=0.4[,prepacked]' | 'defaults' -> (num tokens, threshold, prepacked)."""
    if not key or key == "defaults":
        return None, None, False
    parts = key.split(",")
    num = int(float(parts[0].split("=")[1]))
    thr = float(parts[1].split("=")[1])
    return num, thr, "prepacked" in parts


def repeat_ab(engine, target_model, draft_model, prompts, n: int, best: dict,
              hf_best_key: str | None, repeats: int, lookup: tuple[int, int]) -> dict:
    from specserve_ray.bench.single import time_engine, time_hf

    num, thr, prepacked = _hf_setting(hf_best_key)
    hf_target = engine.target.runner.model if prepacked else target_model
    contenders = {
        "engine_best": lambda: time_engine(engine, prompts, n, best["k"], best["drafter"],
                                           lookup)["tok_s"],
        "engine_k0": lambda: time_engine(engine, prompts, n, 0)["tok_s"],
        "hf_target_only": lambda: time_hf(target_model, None, prompts, n),
        "hf_target_only_prepacked": lambda: time_hf(engine.target.runner.model, None,
                                                    prompts, n),
        "hf_assisted_best": lambda: time_hf(hf_target, draft_model, prompts, n, num, thr),
    }
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    ratios: dict[str, list[float]] = {"speedup_vs_target_only": [],
                                      "speedup_vs_engine_k0": [],
                                      "speedup_vs_hf_assisted": []}
    for rep in range(repeats):
        order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        got = {name: contenders[name]() for name in order}
        for name, tok_s in got.items():
            runs[name].append(tok_s)
        target_only = max(got["engine_k0"], got["hf_target_only"],
                          got["hf_target_only_prepacked"])
        ratios["speedup_vs_target_only"].append(got["engine_best"] / target_only)
        ratios["speedup_vs_engine_k0"].append(got["engine_best"] / got["engine_k0"])
        ratios["speedup_vs_hf_assisted"].append(got["engine_best"] / got["hf_assisted_best"])
        print(f"  repeat {rep + 1}/{repeats}: " + ", ".join(
            f"{k} {v[-1]:.3f}x" for k, v in ratios.items()), flush=True)
    return {"n": repeats, "best": {"drafter": best["drafter"], "k": best["k"]},
            "hf_assisted_setting": hf_best_key or "defaults",
            "order": "all contenders per repeat, every other repeat reversed",
            "ratios": {k: spread(v) for k, v in ratios.items()},
            "tok_s": {k: spread(v) for k, v in runs.items()}}
