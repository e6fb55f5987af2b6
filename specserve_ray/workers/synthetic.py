"""Synthetic acceptance: BENCHMARK ONLY, NOT LOSSLESS (never on by default).

Each draft token is accepted with a fixed probability instead of by the rejection test, so
the cost behaviour of a system (random-initialised large models on a GPU, say) can be
measured at a chosen acceptance rate, as vLLM's synthetic-acceptance mode allows. The
target still runs its full verification forward; only the outcome is replaced. After the
accepted prefix the target's argmax is emitted (the usual recovered / bonus position).

A real rejection never emits the rejected draft token (the recovered distribution has no
mass there), and the draft worker's cache sync relies on it. Where the target's argmax is
that very token, the next token id stands in: benchmark text, never served output.
"""
from __future__ import annotations

import torch

from specserve_ray.core.rejection import PLACEHOLDER_TOKEN_ID


def synthetic_accept(draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor,
                     target_argmax: torch.Tensor, rate: float, vocab_size: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept each draft token with probability `rate`, stopping at the first rejection.

    draft_token_ids: [B, K]; num_draft_tokens: [B]; target_argmax: [B, K+1].
    Returns output_ids [B, K+1] (padded with PLACEHOLDER_TOKEN_ID) and num_emitted [B].
    """
    batch, max_k = draft_token_ids.shape
    pos = torch.arange(max_k)
    trials = torch.rand(batch, max_k, generator=generator) < rate
    trials &= pos.unsqueeze(0) < num_draft_tokens.unsqueeze(1)    # only real drafts
    num_accepted = trials.long().cumprod(dim=1).sum(dim=1)        # [B]: leading successes
    out_pos = torch.arange(max_k + 1).unsqueeze(0)
    drafts = torch.cat([draft_token_ids, torch.full((batch, 1), PLACEHOLDER_TOKEN_ID,
                                                    dtype=draft_token_ids.dtype)], dim=1)
    n = num_accepted.unsqueeze(1)
    final = target_argmax.to(drafts.dtype).gather(1, n).squeeze(1)           # [B]
    rejected = drafts.gather(1, n).squeeze(1)             # PLACEHOLDER when all accepted
    final = torch.where(final == rejected, (final + 1) % vocab_size, final)
    output_ids = torch.where(out_pos < n, drafts,
                             torch.where(out_pos == n, final.unsqueeze(1),
                                         torch.full_like(drafts, PLACEHOLDER_TOKEN_ID)))
    return output_ids, num_accepted + 1
