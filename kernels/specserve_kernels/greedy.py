"""Greedy verification straight from the target's logits, on their device.

The drop-in for `specserve_ray.core.rejection.rejection_sample` when every row of a step
is greedy: accept while the draft equals the target's argmax, then emit the argmax at the
first disagreement (or the bonus position). Only `[B, K+1]` argmax ids ever leave the
device, never the `[B, K+1, V]` logits, and no probability tensor is built.
"""

from __future__ import annotations

import torch

from specserve_ray.core.rejection import PLACEHOLDER_TOKEN_ID

__all__ = ["greedy_verify"]


def greedy_verify(
    draft_token_ids: torch.Tensor,  # [B, K] int64, PLACEHOLDER_TOKEN_ID past num_draft_tokens
    num_draft_tokens: torch.Tensor,  # [B] int64 in 0..K
    window_logits: torch.Tensor,  # [B, K+1, V] any float dtype, any device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (output_token_ids [B, K+1] int64 on CPU, num_emitted [B] int64 on CPU),
    exactly what `rejection_sample` returns for all-greedy rows."""
    target_argmax = window_logits.argmax(-1).cpu()                    # [B, K+1]
    batch_size, num_draft_slots = draft_token_ids.shape
    positions = torch.arange(num_draft_slots)
    is_real = positions.unsqueeze(0) < num_draft_tokens.unsqueeze(-1)
    accepts = is_real & (draft_token_ids == target_argmax[:, :num_draft_slots])
    num_accepted = torch.cumprod(accepts.long(), dim=-1).sum(dim=-1)  # leading matches
    output = torch.where(positions.unsqueeze(0) < num_accepted.unsqueeze(-1),
                         draft_token_ids, PLACEHOLDER_TOKEN_ID)
    output = torch.cat([output, torch.full((batch_size, 1), PLACEHOLDER_TOKEN_ID,
                                           dtype=torch.long)], dim=-1)
    output.scatter_(1, num_accepted.unsqueeze(-1), target_argmax.gather(1, num_accepted.unsqueeze(-1)))
    return output, num_accepted + 1
