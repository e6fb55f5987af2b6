"""Plain messages between the step loop and the draft/target workers.

They cross a process boundary when the workers are Ray actors, so they are small frozen
dataclasses of ints, lists and CPU tensors, with no model or tokenizer inside.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqSampling:
    """The sampling knobs a worker needs for one sequence (hot-path copy of SamplingParams)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class PrefillItem:
    seq_id: str
    prompt_ids: list[int]
    sampling: SeqSampling


@dataclass(frozen=True)
class Proposal:
    """Draft tokens for a batch, rows aligned with the request order of the step."""

    draft_token_ids: torch.Tensor        # [B, K] int64, PLACEHOLDER past num_draft_tokens
    num_draft_tokens: torch.Tensor       # [B] int64, tokens sent to the target for verification
    draft_probs: torch.Tensor | None     # [B, K, V] float32; None when every row is greedy
    draft_confidence: torch.Tensor       # [B, D] float32: draft prob of each drafted token
    seconds: float                       # time spent in draft forwards
    # [B] int64 tokens drafted per row, when an early stop or a verify trim made it differ
    # from both the plan's caps and num_draft_tokens; None = num_draft_tokens.
    num_drafted: torch.Tensor | None = None

    @property
    def drafted(self) -> torch.Tensor:
        return self.num_draft_tokens if self.num_drafted is None else self.num_drafted


@dataclass(frozen=True)
class VerifyResult:
    emitted: list[list[int]]             # per row: accepted drafts then one final token
    num_accepted: list[int]              # per row: accepted draft tokens
    seconds: float                       # time spent in the target forward + sampling
