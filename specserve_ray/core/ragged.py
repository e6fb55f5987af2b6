"""Ragged verification inputs: each row feeds its own number of new tokens.

Row b holds a KV cache of cache_lens[b] tokens, left-aligned in key columns
0..cache_lens[b]-1, and appends num_tokens[b] new tokens (drafts to verify) in the
columns right after it. Rows are right-padded to a common width T so one batched
forward scores them all; the helpers here build that layout and read results back.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch

__all__ = ["RaggedBatch", "pack_ragged", "positions_and_mask", "unpad", "gather_last",
           "group_by_length"]


@dataclass(frozen=True, eq=False)  # eq on tensors is elementwise, so no generated __eq__
class RaggedBatch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded with pad_id
    num_tokens: torch.Tensor  # [B] int64, valid tokens per row (>= 1)
    cu_seqlens: torch.Tensor  # [B+1] int64, row b is flat_token_ids[cu[b]:cu[b+1]]
    flat_token_ids: torch.Tensor  # [sum(num_tokens)] int64, rows concatenated

    @property
    def max_tokens(self) -> int:
        return self.input_ids.shape[1]


def pack_ragged(token_lists: list[list[int]], pad_id: int) -> RaggedBatch:
    """Right-pad per-row token lists into a RaggedBatch (CPU tensors)."""
    if not token_lists:
        raise ValueError("pack_ragged needs at least one row")
    row_lengths = [len(tokens) for tokens in token_lists]
    if min(row_lengths) == 0:
        # A row with nothing to score has no last position to read a next token from.
        raise ValueError(f"pack_ragged: row {row_lengths.index(0)} is empty")

    width = max(row_lengths)
    if width == 1:
        # One token per row (every draft step after the first): the cheapest shapes.
        flat = torch.tensor([tokens[0] for tokens in token_lists], dtype=torch.long)
        num_tokens = torch.ones(len(token_lists), dtype=torch.long)
        return RaggedBatch(flat.unsqueeze(1), num_tokens,
                           torch.arange(len(token_lists) + 1, dtype=torch.long), flat)
    if min(row_lengths) == width:
        # Every row the same length (batch 1, a draft step, uniform verify): no padding,
        # so skip the scatter below; this runs once per forward, a few ops matter.
        input_ids = torch.tensor(token_lists, dtype=torch.long)
        num_tokens = torch.full((len(token_lists),), width, dtype=torch.long)
        cu_seqlens = torch.arange(0, len(token_lists) + 1, dtype=torch.long) * width
        return RaggedBatch(input_ids, num_tokens, cu_seqlens, input_ids.reshape(-1))
    flat_token_ids = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long)
    num_tokens = torch.tensor(row_lengths, dtype=torch.long)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(num_tokens, dim=0)])

    # Each flat token's (row, column) in the padded grid.
    row_of_token = torch.repeat_interleave(torch.arange(len(token_lists)), num_tokens)
    column_of_token = torch.arange(flat_token_ids.numel()) - cu_seqlens[row_of_token]
    input_ids = torch.full((len(token_lists), max(row_lengths)), pad_id, dtype=torch.long)
    input_ids[row_of_token, column_of_token] = flat_token_ids
    return RaggedBatch(input_ids, num_tokens, cu_seqlens, flat_token_ids)


def positions_and_mask(
    cache_lens: torch.Tensor,  # [B] int64
    num_tokens: torch.Tensor,  # [B] int64, <= max_tokens
    max_tokens: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Position ids [B, T], additive mask [B, 1, T, KV] in ``dtype``, and KV.

    With ``dtype=torch.bool`` the mask is boolean instead (True = may attend), which
    SDPA takes as is: the same attention without building and adding a float mask.

    KV = max(cache_lens) + T. Query q of row b sits at absolute position
    cache_lens[b] + q and sees key columns c <= that position (and, with a window
    w, c > position - w). Padding queries (q >= num_tokens[b]) get the same rule, so
    no query row is fully masked (which would give NaN softmax); callers drop them.
    """
    if num_tokens.shape != cache_lens.shape:
        raise ValueError("cache_lens and num_tokens must both be [B]")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError("sliding_window must be >= 1")
    device = cache_lens.device
    kv_len = int(cache_lens.max()) + max_tokens

    query_offsets = torch.arange(max_tokens, device=device)  # [T]
    position_ids = cache_lens.unsqueeze(-1) + query_offsets.unsqueeze(0)  # [B, T]
    key_columns = torch.arange(kv_len, device=device).view(1, 1, kv_len)  # [1, 1, KV]
    query_positions = position_ids.unsqueeze(-1)  # [B, T, 1]
    visible = key_columns <= query_positions  # [B, T, KV]
    if sliding_window is not None:
        visible &= key_columns > query_positions - sliding_window

    if dtype == torch.bool:
        return position_ids, visible.unsqueeze(1), kv_len
    attention_mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    attention_mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return position_ids, attention_mask.unsqueeze(1), kv_len


def unpad(
    values: torch.Tensor,  # [B, T, ...]
    num_tokens: torch.Tensor,  # [B] int64
) -> torch.Tensor:  # [sum(num_tokens), ...], rows in order
    """Drop padding positions; the inverse of the padding done by pack_ragged."""
    columns = torch.arange(values.shape[1], device=values.device)
    is_valid = columns.unsqueeze(0) < num_tokens.to(values.device).unsqueeze(-1)  # [B, T]
    # Boolean indexing walks [B, T] row-major, which is exactly flat row order.
    return values[is_valid]


def gather_last(
    values: torch.Tensor,  # [B, T, ...]
    num_tokens: torch.Tensor,  # [B] int64, >= 1
) -> torch.Tensor:  # [B, ...]
    """Each row's value at its last valid position (where its next token is read)."""
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, num_tokens.to(values.device) - 1]


def group_by_length(lengths: list[int], max_padding: float = 0.25) -> list[list[int]]:
    """Split rows into forwards whose right-padding stays within `max_padding` of their
    real tokens (padded positions cost real compute on a CPU). Longest rows first;
    returns lists of row indices."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            width = lengths[group[0]]          # the group's longest row sets its width
            real = sum(lengths[j] for j in group) + lengths[i]
            if width * (len(group) + 1) <= (1 + max_padding) * real:
                group.append(i)
                continue
        groups.append([i])
    return groups
