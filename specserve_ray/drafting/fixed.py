"""Fixed drafts (n-gram proposals made by the scheduler) as a `Proposal`.

A fixed draft is a point-mass draft distribution: q(x) = 1 on the proposed token. For a
sampled row rejection sampling then accepts x with probability p(x) and, on rejection,
draws from normalize(max(p - q, 0)) = the target's distribution with x removed, which
keeps the output distributed exactly as the target. Greedy rows never read q.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from specserve_ray.contracts import Proposal
from specserve_ray.core.rejection import PLACEHOLDER_TOKEN_ID

__all__ = ["model_caps", "fixed_proposal", "merge_fixed", "with_point_mass"]


def model_caps(num_draft: Sequence[int], fixed: Sequence[list[int] | None] | None) -> list[int]:
    """The draft model's caps: 0 for rows that already carry a fixed draft."""
    if fixed is None:
        return list(num_draft)
    return [0 if f is not None else k for k, f in zip(num_draft, fixed)]


def _pad(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.shape[1] >= width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1], *t.shape[2:]), value, dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def fixed_proposal(fixed: Sequence[list[int] | None],
                   confidence: Sequence[list[float] | None]) -> Proposal:
    """A Proposal holding only fixed drafts (rows with None draft nothing)."""
    empty = Proposal(torch.empty(len(fixed), 0, dtype=torch.long),
                     torch.zeros(len(fixed), dtype=torch.long), None,
                     torch.zeros(len(fixed), 0), 0.0)
    return merge_fixed(empty, fixed, confidence)


def merge_fixed(proposal: Proposal, fixed: Sequence[list[int] | None],
                confidence: Sequence[list[float] | None]) -> Proposal:
    """Write the fixed rows into a model proposal whose caps were 0 for them."""
    rows = [i for i, f in enumerate(fixed) if f is not None]
    if not rows:
        return proposal
    width = max([proposal.draft_token_ids.shape[1]] + [len(fixed[i]) for i in rows])
    conf_width = max([proposal.draft_confidence.shape[1]] + [len(fixed[i]) for i in rows])
    ids = _pad(proposal.draft_token_ids.clone(), width, PLACEHOLDER_TOKEN_ID)
    conf = _pad(proposal.draft_confidence.clone(), conf_width, 0.0)
    num = proposal.num_draft_tokens.clone()
    drafted = None if proposal.num_drafted is None else proposal.num_drafted.clone()
    probs = None if proposal.draft_probs is None else _pad(proposal.draft_probs, width, 0.0)
    is_fixed = torch.zeros(len(fixed), dtype=torch.bool)
    for i in rows:
        n = len(fixed[i])
        ids[i, :] = PLACEHOLDER_TOKEN_ID
        conf[i, :] = 0.0
        if n:
            ids[i, :n] = torch.tensor(fixed[i], dtype=torch.long)
            conf[i, :n] = torch.tensor(confidence[i], dtype=torch.float32)
        num[i] = n
        if drafted is not None:
            drafted[i] = n
        if probs is not None:
            probs[i] = 0.0
        is_fixed[i] = True
    return replace(proposal, draft_token_ids=ids, num_draft_tokens=num, draft_probs=probs,
                   draft_confidence=conf, num_drafted=drafted, fixed_rows=is_fixed)


def with_point_mass(proposal: Proposal, sampled: Sequence[bool], vocab_size: int
                    ) -> torch.Tensor | None:  # [B, K, V] or None
    """The draft_probs the target verifies with: the model's rows as drafted, one-hot
    rows for the fixed drafts of sampled requests. None when every row is greedy."""
    if not any(sampled):
        return proposal.draft_probs
    ids = proposal.draft_token_ids
    batch, width = ids.shape
    probs = proposal.draft_probs
    if probs is None:
        probs = torch.zeros(batch, width, vocab_size)
    if proposal.fixed_rows is None:
        return probs
    probs = probs.clone()
    for i in torch.nonzero(proposal.fixed_rows).flatten().tolist():
        if not sampled[i]:
            continue
        n = int(proposal.num_draft_tokens[i])
        probs[i] = 0.0
        if n:
            probs[i, torch.arange(n), ids[i, :n]] = 1.0
    return probs
