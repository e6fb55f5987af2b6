"""Plain loop references for the vectorized ops; readable, slow, for tests only.

Each function takes the same inputs as its vectorized twin and must return the
same outputs exactly (same random inputs -> same tokens).
"""

from __future__ import annotations

import torch

from .ragged import RaggedBatch
from .rejection import PLACEHOLDER_TOKEN_ID

__all__ = [
    "rejection_sample_reference",
    "pack_ragged_reference",
    "positions_and_mask_reference",
    "unpad_reference",
    "gather_last_reference",
]


def _race(weights: torch.Tensor, noise: torch.Tensor) -> int:  # [V], [V] -> token id
    safe_noise = noise.clamp_min(torch.finfo(noise.dtype).tiny)
    return int(torch.argmax(weights / safe_noise))


def rejection_sample_reference(
    draft_token_ids: torch.Tensor,  # [B, K] int64
    num_draft_tokens: torch.Tensor,  # [B] int64
    draft_probs: torch.Tensor | None,  # [B, K, V] float32
    target_probs: torch.Tensor | None,  # [B, K+1, V] float32
    target_argmax: torch.Tensor,  # [B, K+1] int64
    is_greedy: torch.Tensor,  # [B] bool
    uniform_samples: torch.Tensor | None,  # [B, K] float32
    exponential_noise: torch.Tensor | None,  # [B, V] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    batch_size, num_draft_slots = draft_token_ids.shape
    output_token_ids = torch.full((batch_size, num_draft_slots + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long)
    num_emitted = torch.zeros(batch_size, dtype=torch.long)

    for row in range(batch_size):
        num_drafts = int(num_draft_tokens[row])
        emitted: list[int] = []
        final_token = None
        for position in range(num_drafts):
            draft_token = int(draft_token_ids[row, position])
            if bool(is_greedy[row]):
                if draft_token == int(target_argmax[row, position]):
                    emitted.append(draft_token)
                    continue
                final_token = int(target_argmax[row, position])
                break
            draft_prob = float(draft_probs[row, position, draft_token])
            target_prob = float(target_probs[row, position, draft_token])
            if target_prob > 0 and float(uniform_samples[row, position]) * draft_prob <= target_prob:
                emitted.append(draft_token)
                continue
            residual = (target_probs[row, position] - draft_probs[row, position]).clamp_min(0.0)
            if float(residual.max()) <= 0:
                residual = target_probs[row, position]  # p == q here: fall back to target
            final_token = _race(residual, exponential_noise[row])
            break

        if final_token is None:  # every draft accepted: bonus token at position num_drafts
            if bool(is_greedy[row]):
                final_token = int(target_argmax[row, num_drafts])
            else:
                final_token = _race(target_probs[row, num_drafts], exponential_noise[row])
        emitted.append(final_token)
        output_token_ids[row, : len(emitted)] = torch.tensor(emitted, dtype=torch.long)
        num_emitted[row] = len(emitted)
    return output_token_ids, num_emitted


def pack_ragged_reference(token_lists: list[list[int]], pad_id: int) -> RaggedBatch:
    if not token_lists or any(len(tokens) == 0 for tokens in token_lists):
        raise ValueError("pack_ragged needs non-empty rows")
    max_tokens = max(len(tokens) for tokens in token_lists)
    input_ids = torch.full((len(token_lists), max_tokens), pad_id, dtype=torch.long)
    flat: list[int] = []
    cu_seqlens = [0]
    for row, tokens in enumerate(token_lists):
        for column, token in enumerate(tokens):
            input_ids[row, column] = token
        flat.extend(tokens)
        cu_seqlens.append(cu_seqlens[-1] + len(tokens))
    return RaggedBatch(
        input_ids=input_ids,
        num_tokens=torch.tensor([len(tokens) for tokens in token_lists], dtype=torch.long),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.long),
        flat_token_ids=torch.tensor(flat, dtype=torch.long),
    )


def positions_and_mask_reference(
    cache_lens: torch.Tensor,  # [B] int64
    num_tokens: torch.Tensor,  # [B] int64
    max_tokens: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    batch_size = cache_lens.shape[0]
    kv_len = max(int(length) for length in cache_lens) + max_tokens
    position_ids = torch.zeros(batch_size, max_tokens, dtype=torch.long)
    attention_mask = torch.full((batch_size, 1, max_tokens, kv_len), torch.finfo(dtype).min, dtype=dtype)
    for row in range(batch_size):
        for query in range(max_tokens):
            position = int(cache_lens[row]) + query
            position_ids[row, query] = position
            for column in range(kv_len):
                visible = column <= position
                if sliding_window is not None:
                    visible = visible and column > position - sliding_window
                if visible:
                    attention_mask[row, 0, query, column] = 0.0
    return position_ids, attention_mask, kv_len


def unpad_reference(values: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    pieces = [values[row, : int(num_tokens[row])] for row in range(values.shape[0])]
    return torch.cat(pieces, dim=0)


def gather_last_reference(values: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    return torch.stack([values[row, int(num_tokens[row]) - 1] for row in range(values.shape[0])])
