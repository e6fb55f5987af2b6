"""Prompts for a workload: held-out text of the models' domain, cut to exact token counts.

The load generator sends text (as any OpenAI client would); the server tokenizes it
without special tokens, so a prompt counts as n tokens only if re-encoding the cut text
gives n ids. Cutting at a token boundary and decoding usually round-trips, but a cut can
split a merge or a multi-byte character; `cut_prompt` checks and tries nearby cuts.
"""
from __future__ import annotations

import numpy as np

from specserve_ray.prompts import held_out_files


def load_tokenizer(path: str | None = None):
    """The embedded pair's tokenizer (or `path`), from local files only: never downloads."""
    from transformers import AutoTokenizer

    from specserve_ray.config import EMBEDDED_TARGET

    return AutoTokenizer.from_pretrained(path or EMBEDDED_TARGET, local_files_only=True)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cut_prompt(tokenizer, ids: list[int], num_tokens: int) -> str | None:
    """Text from a prefix of `ids` that re-encodes to exactly `num_tokens` tokens."""
    for m in sorted(range(max(1, num_tokens - 4), num_tokens + 9), key=lambda m: abs(m - num_tokens)):
        if m > len(ids):
            continue
        text = tokenizer.decode(ids[:m])
        if text and len(_encode(tokenizer, text)) == num_tokens:
            return text
    return None


class PromptSource:
    """Deterministic held-out prompts: request j of a workload gets the same text for
    every policy, so all policies see identical work."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.seed = seed
        # One corpus of all held-out files, so even the longest prompt fits anywhere.
        self.corpus = "\n".join(f.read_text(encoding="utf-8", errors="replace")
                                for f in held_out_files())
        if len(self.corpus) < 100_000:
            raise RuntimeError("held-out stdlib sources not found (email/, http/, xml/)")

    def prompt(self, index: int, num_tokens: int) -> str:
        rng = np.random.default_rng([self.seed, index])
        for _ in range(64):
            # Start at a line start; take enough characters for the tokens (code BPE
            # averages well under 8 characters per token).
            chars = 8 * num_tokens + 64
            pos = self.corpus.find("\n", int(rng.integers(max(1, len(self.corpus) - chars)))) + 1
            ids = _encode(self.tokenizer, self.corpus[pos:pos + chars])
            if len(ids) < num_tokens:
                continue
            cut = cut_prompt(self.tokenizer, ids, num_tokens)
            if cut is not None:
                return cut
        raise RuntimeError(f"could not cut a held-out prompt of {num_tokens} tokens")

    def prompts(self, lengths: list[int], offset: int = 0) -> list[str]:
        return [self.prompt(offset + j, n) for j, n in enumerate(lengths)]
