"""Speculative-decoding verification: rejection sampling of draft tokens.

Glossary (per batch row, one verification step):
  accepted tokens  - the leading draft tokens the target agrees to keep; emitted as-is.
  recovered token  - drawn at the first rejected position from the residual
                     normalize(max(0, target_probs - draft_probs)); it replaces the
                     rejected draft token and ends the step.
  bonus token      - drawn from the target at the position after the last draft
                     token when every draft token was accepted (one free token).
Each row therefore emits ``accepted + 1`` tokens: its accepted drafts, then exactly
one final token that is either recovered or bonus.

Sampled rows use the rule of Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding" (arXiv 2211.17192) and Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling"
(arXiv 2302.01318): accept draft token x with probability min(1, p(x) / q(x)), which
makes the emitted tokens exactly distributed as the target. Greedy rows accept while
the draft equals the target argmax, which makes them exactly the target's greedy output.

All randomness comes in as tensors, so the function is pure and reproducible.
"""

from __future__ import annotations

import torch

__all__ = ["PLACEHOLDER_TOKEN_ID", "rejection_sample"]

PLACEHOLDER_TOKEN_ID = -1


def _exponential_race(
    weights: torch.Tensor,  # [B, V] nonnegative, need not be normalized
    exponential_noise: torch.Tensor,  # [B, V] iid Exp(1)
) -> torch.Tensor:  # [B] int64, a draw from normalize(weights)
    # An Exp(1) draw of exactly 0 would give 0/0 = NaN, and argmax treats NaN as max.
    safe_noise = exponential_noise.clamp_min(torch.finfo(exponential_noise.dtype).tiny)
    return torch.argmax(weights / safe_noise, dim=-1)


def _count_leading_true(accepted: torch.Tensor) -> torch.Tensor:  # [B, K] bool -> [B] int64
    # The cumulative product zeroes everything after the first rejection.
    return torch.cumprod(accepted.long(), dim=-1).sum(dim=-1)


def _assemble_output(
    draft_token_ids: torch.Tensor,  # [B, K] int64
    num_accepted: torch.Tensor,  # [B] int64
    final_token_ids: torch.Tensor,  # [B] int64
) -> tuple[torch.Tensor, torch.Tensor]:
    batch_size, num_draft_slots = draft_token_ids.shape
    positions = torch.arange(num_draft_slots, device=draft_token_ids.device)
    kept_drafts = torch.where(
        positions.unsqueeze(0) < num_accepted.unsqueeze(-1), draft_token_ids, PLACEHOLDER_TOKEN_ID
    )
    placeholder_column = torch.full(
        (batch_size, 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=draft_token_ids.device
    )
    output_token_ids = torch.cat([kept_drafts, placeholder_column], dim=-1)
    output_token_ids.scatter_(1, num_accepted.unsqueeze(-1), final_token_ids.unsqueeze(-1))
    return output_token_ids, num_accepted + 1


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [B, K] int64, PLACEHOLDER_TOKEN_ID past num_draft_tokens
    num_draft_tokens: torch.Tensor,  # [B] int64 in 0..K
    draft_probs: torch.Tensor | None,  # [B, K, V] float32; None only if all rows greedy
    target_probs: torch.Tensor | None,  # [B, K+1, V] float32; None only if all rows greedy
    target_argmax: torch.Tensor,  # [B, K+1] int64
    is_greedy: torch.Tensor,  # [B] bool
    uniform_samples: torch.Tensor | None,  # [B, K] float32 in [0, 1); unused if all greedy
    exponential_noise: torch.Tensor | None,  # [B, V] float32 Exp(1); unused if all greedy
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify one step of drafts for a batch; returns (output_token_ids, num_emitted).

    output_token_ids: [B, K+1] int64, accepted drafts then the final (recovered or
    bonus) token, padded with PLACEHOLDER_TOKEN_ID. num_emitted: [B] int64 = accepted + 1.
    """
    batch_size, num_draft_slots = draft_token_ids.shape
    device = draft_token_ids.device
    positions = torch.arange(num_draft_slots, device=device)
    is_real_draft = positions.unsqueeze(0) < num_draft_tokens.unsqueeze(-1)  # [B, K]

    greedy_accepts = is_real_draft & (draft_token_ids == target_argmax[:, :num_draft_slots])
    if bool(is_greedy.all()):
        # Greedy-only batches never read (or need) any probability tensor.
        num_accepted = _count_leading_true(greedy_accepts)
        final_token_ids = target_argmax.gather(1, num_accepted.unsqueeze(-1)).squeeze(-1)
        return _assemble_output(draft_token_ids, num_accepted, final_token_ids)

    if target_probs is None or exponential_noise is None:
        raise ValueError("target_probs and exponential_noise are required when any row samples")
    if num_draft_slots > 0 and (draft_probs is None or uniform_samples is None):
        raise ValueError("draft_probs and uniform_samples are required when any row samples")

    if num_draft_slots > 0:
        # Placeholders (-1) are not valid indices; their results are masked by is_real_draft.
        gather_ids = draft_token_ids.clamp_min(0).unsqueeze(-1)  # [B, K, 1]
        draft_prob_of_draft = draft_probs.gather(2, gather_ids).squeeze(-1)  # [B, K]
        target_prob_of_draft = target_probs[:, :num_draft_slots].gather(2, gather_ids).squeeze(-1)
        # u * q <= p is u < min(1, p/q) without dividing; the p > 0 term only matters
        # when u == 0 and stops a token the target forbids from ever being accepted.
        sampled_accepts = (uniform_samples * draft_prob_of_draft <= target_prob_of_draft) & (
            target_prob_of_draft > 0
        )
        sampled_accepts &= is_real_draft
        accepts = torch.where(is_greedy.unsqueeze(-1), greedy_accepts, sampled_accepts)
    else:
        accepts = greedy_accepts
    num_accepted = _count_leading_true(accepts)  # [B]

    vocab_size = target_probs.shape[-1]
    final_position = num_accepted.view(batch_size, 1, 1).expand(batch_size, 1, vocab_size)
    target_at_final = target_probs.gather(1, final_position).squeeze(1)  # [B, V]
    final_distribution = target_at_final
    if num_draft_slots > 0:
        # Rows that stopped on a rejection draw from the residual; at the bonus
        # position there is no draft, so the clamp only keeps the gather in range.
        draft_position = final_position.clamp_max(num_draft_slots - 1)
        draft_at_final = draft_probs.gather(1, draft_position).squeeze(1)  # [B, V]
        residual = (target_at_final - draft_at_final).clamp_min(0.0)
        was_rejected = num_accepted < num_draft_tokens  # [B]
        # A residual with no mass means p == q numerically there; rejection then has
        # probability ~0, and the target itself is the right fallback.
        use_residual = was_rejected & (residual > 0).any(dim=-1)
        final_distribution = torch.where(use_residual.unsqueeze(-1), residual, target_at_final)
    # The race is scale invariant, so the residual needs no normalization.
    sampled_final = _exponential_race(final_distribution, exponential_noise)
    greedy_final = target_argmax.gather(1, num_accepted.unsqueeze(-1)).squeeze(-1)
    final_token_ids = torch.where(is_greedy, greedy_final, sampled_final)
    return _assemble_output(draft_token_ids, num_accepted, final_token_ids)
