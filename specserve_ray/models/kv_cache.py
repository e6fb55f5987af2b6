"""A slot-based KV cache with a length per row, usable by any Hugging Face causal LM.

Each running request owns one slot (a row) of preallocated key/value tensors, per layer
`[num_slots, num_heads, capacity, head_dim]`. Requests have different lengths, so a
forward writes each row's new keys at that row's own columns and the caller passes a
custom 4D attention mask (see `specserve_ray.core.ragged.positions_and_mask`) that hides
everything past a row's length. Rolling back rejected draft tokens is then free: only
the row's length changes, the stale columns are masked and later overwritten.

Live slots are kept compact (0..n-1): when a request leaves, the last live row moves
into its slot. A forward over all live rows in slot order reads the cache as a view,
with no copy; a forward over a subset gathers those rows.

The object implements the one method HF attention layers call, `update`, and the
lengths HF asks for when no positions are given (we always give them).
"""
from __future__ import annotations

import torch


class SlotKVCache:
    is_compileable = False

    def __init__(self, num_layers: int, num_slots: int, initial_capacity: int = 256):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.capacity = initial_capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers    # [S, H, C, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # Set by `plan` before each forward:
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._write_block: tuple[slice, slice] | None = None   # (rows, columns) when rectangular
        self._write_rows: torch.Tensor | None = None   # [B, T] slot per written token
        self._write_cols: torch.Tensor | None = None   # [B, T] column per written token
        self._kv_len = 0

    # -- planning (called by the runner, once per forward) -------------------------------
    def plan(self, slots: list[int], cache_lens: list[int], num_new: int, kv_len: int):
        """Prepare a forward of `num_new` (padded) tokens per row for rows `slots` [B]."""
        needed = max(cache_lens) + num_new
        if needed > self.capacity:
            self._grow(needed)
        b = len(slots)
        first = slots[0]
        contiguous = slots == list(range(first, first + b))
        self._rows = slice(first, first + b) if contiguous else torch.tensor(slots)
        self._kv_len = kv_len
        if contiguous and min(cache_lens) == max(cache_lens):
            # One rectangle of the cache (batch 1 always): a strided copy, no scatter.
            self._write_block = (self._rows, slice(cache_lens[0], cache_lens[0] + num_new))
            return
        self._write_block = None
        slots_t = torch.tensor(slots, dtype=torch.long)
        self._write_rows = slots_t.unsqueeze(1).expand(b, num_new)
        self._write_cols = (torch.tensor(cache_lens, dtype=torch.long).unsqueeze(1)
                            + torch.arange(num_new).unsqueeze(0))

    def _grow(self, needed: int) -> None:
        new_cap = self.capacity
        while new_cap < needed:
            new_cap *= 2
        for i in range(self.num_layers):
            for store in (self.keys, self.values):
                old = store[i]
                if old is None:
                    continue
                grown = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
                grown[:, :, : self.capacity] = old
                store[i] = grown
        self.capacity = new_cap

    # -- the HF cache protocol --------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states/value_states: [B, H, T, D] for the planned rows
        if self.keys[layer_idx] is None:
            shape = (self.num_slots, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(
                (self.num_slots, value_states.shape[1], self.capacity, value_states.shape[3]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        dev = keys.device
        if self._write_block is not None:
            rows, cols = self._write_block
            keys[rows, :, cols].copy_(key_states)
            values[rows, :, cols].copy_(value_states)
        else:
            rows = self._write_rows.to(dev, non_blocking=True)
            cols = self._write_cols.to(dev, non_blocking=True)
            # Advanced indices around a slice put the indexed dims first: [B, T, H, D].
            keys[rows, :, cols] = key_states.transpose(1, 2).to(keys.dtype)
            values[rows, :, cols] = value_states.transpose(1, 2).to(values.dtype)
        sel = self._rows if isinstance(self._rows, slice) else self._rows.to(dev)
        return keys[sel, :, : self._kv_len], values[sel, :, : self._kv_len]

    # -- the flat (unpadded) forward: one row at a time (models/flat_forward.py) ---------
    def reserve(self, needed: int) -> None:
        """Make room for `needed` columns in every slot."""
        if needed > self.capacity:
            self._grow(needed)

    def write_and_read(self, layer_idx: int, slot: int, start: int, key_states: torch.Tensor,
                       value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one row's new keys/values ([1, H, n, D]) at columns start..start+n-1 of
        `slot`; return the slot's keys/values up to there ([1, H, start+n, D], views)."""
        if self.keys[layer_idx] is None:
            shape = (self.num_slots, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape[:3] + (value_states.shape[3],))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        end = start + key_states.shape[2]
        keys[slot, :, start:end].copy_(key_states[0])
        values[slot, :, start:end].copy_(value_states[0])
        return keys[slot:slot + 1, :, :end], values[slot:slot + 1, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self._kv_len, 0

    # -- slot management --------------------------------------------------------------------
    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` columns of slot `src` into slot `dst` (compaction)."""
        for store in (self.keys, self.values):
            for t in store:
                if t is not None:
                    t[dst, :, :length] = t[src, :, :length]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in (self.keys, self.values)
                   for t in s if t is not None)
