"""Which rows the scheduler drafts itself (prompt lookup), and what it proposes for them.

Pure: token buffers, caps and drafter names in; fixed drafts, their confidences and match
lengths out. It also keeps the two acceptance estimates it decides by (n-gram tokens per
match length and depth, draft-model tokens per depth), fed from every verified step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from specserve_ray.drafting.ngram import NgramAcceptance, expected_accepted, propose

__all__ = ["FixedDrafts", "NgramPlanner"]


@dataclass(frozen=True)
class FixedDrafts:
    """Per decode row: the n-gram draft (None = the draft model drafts the row)."""

    drafts: list[list[int] | None]
    confidence: list[list[float] | None]
    match_lengths: list[int | None]


class NgramPlanner:
    def __init__(self, max_n: int = 32, max_k: int = 16):
        self.ngram_acceptance = NgramAcceptance(max_n, max_k)
        self.model_acceptance = NgramAcceptance(0, max_k)   # by depth only

    def plan(self, histories: Sequence[np.ndarray | None], ks: Sequence[int],
             drafters: Sequence[str], lookup: tuple[int, int], has_model: bool,
             threshold: float | None = None) -> FixedDrafts | None:
        """Proposals for the rows whose drafter is not 'model' (histories [L] int64 there).

        'ngram' rows always carry a fixed draft (empty without a match: a plain step);
        'model+ngram' rows only when the match's expected accepted tokens (observed n-gram
        acceptance at its match length) reach the draft model's (observed by depth); n-gram
        wins ties, it costs no draft forward. With a `threshold` (the policy's in-loop
        stop rule) a proposal goes on while its last token's confidence reaches it.
        """
        if all(d == "model" for d in drafters):
            return None
        out = FixedDrafts([], [], [])
        for tokens_so_far, k, drafter in zip(histories, ks, drafters):
            tokens, n = [], 0
            if drafter != "model" and k > 0:
                tokens, n = propose(tokens_so_far, k, lookup[0], lookup[1])
            conf = self.ngram_acceptance.confidences(n, len(tokens)) if tokens else []
            if drafter == "model+ngram" and tokens and has_model:
                model_conf = self.model_acceptance.confidences(0, k)
                if expected_accepted(conf) < expected_accepted(model_conf):
                    tokens = []
            if drafter == "model" or (drafter == "model+ngram" and not tokens):
                out.drafts.append(None)
                out.confidence.append(None)
                out.match_lengths.append(None)
                continue
            if threshold is not None:
                keep = 1
                while keep < len(tokens) and conf[keep - 1] >= threshold:
                    keep += 1
                tokens, conf = tokens[:keep], conf[:keep]
            out.drafts.append(tokens)
            out.confidence.append(conf)
            out.match_lengths.append(n)
        return out

    def observe(self, match_length: int | None, num_drafted: int, num_accepted: int) -> None:
        """One verified row: an n-gram row (its match length) or a model row (None)."""
        if match_length is not None:
            self.ngram_acceptance.observe(match_length, num_drafted, num_accepted)
        elif num_drafted > 0:
            self.model_acceptance.observe(0, num_drafted, num_accepted)
