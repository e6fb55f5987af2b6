"""Held-out prompts of the embedded pair's domain (Python source), for demos and benchmarks.

The pair was trained on the standard library minus the packages below, which every Python
installation carries; prompts are cut from them at line starts, deterministically.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

HELD_OUT_PACKAGES = ("email", "http", "xml")


def held_out_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for pkg in HELD_OUT_PACKAGES:
        files.extend(p for p in sorted((root / pkg).rglob("*.py")) if "test" not in p.parts)
    return files


def held_out_prompts(tokenizer, count: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of exactly `prompt_tokens` tokens, each starting at a line start."""
    files = [f for f in held_out_files() if f.stat().st_size > 4000]
    if not files:
        raise RuntimeError("held-out stdlib sources not found")
    prompts = []
    i = seed
    while len(prompts) < count:
        text = files[i % len(files)].read_text(encoding="utf-8", errors="replace")
        # A different start per visit of the same file, at a line boundary.
        start = text.find("\n", (len(text) // 3 + 997 * (i // len(files))) % max(1, len(text) - 2000))
        ids = tokenizer(text[start + 1:], add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        i += 1
        if i > seed + 50 * count:
            raise RuntimeError("could not cut enough held-out prompts")
    return prompts


def held_out_text(tokenizer, num_tokens: int, seed: int = 0) -> str:
    """Held-out text of about `num_tokens` tokens (trace replay cuts prompts from it)."""
    return tokenizer.decode(held_out_prompts(tokenizer, 1, num_tokens, seed)[0])
