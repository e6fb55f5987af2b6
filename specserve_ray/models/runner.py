"""ModelRunner: one Hugging Face causal LM with a per-request KV cache.

The runner knows nothing of speculation. It feeds each request (a "sequence") its own
number of new tokens in one batched forward, returns the logits, and lets the caller
roll a sequence back to any shorter length. Draft and target workers are built on it.

Works with any HF causal LM whose attention layers call `cache.update(...)` and accept
a 4D additive mask and explicit position ids (Llama, Qwen2, Mistral, GPT-2, ...).
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specserve_ray.core.ragged import gather_last, pack_ragged, positions_and_mask
from specserve_ray.config import ModelConfig
from specserve_ray.models.flat_forward import flat_forward, supports_flat
from specserve_ray.models.kv_cache import SlotKVCache
from specserve_kernels.lean_llama import lean_llama_or_none
from specserve_kernels.packed_linear import can_prepack, prepack_linears

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model directory is missing, unreadable or unsupported."""


def load_causal_lm(cfg: ModelConfig):
    """Load model and tokenizer from a local directory; never touches the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no Hugging Face model at {cfg.path!r} (config.json missing)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    kwargs = dict(dtype=_DTYPES[cfg.dtype], attn_implementation="sdpa", local_files_only=True)
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except OSError as exc:  # missing weights / tokenizer files
        raise ModelLoadError(f"cannot load model at {cfg.path!r}: {exc}") from exc
    if not cfg.device_map:
        model.to(cfg.device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


@dataclass
class _Seq:
    slot: int
    cache_len: int = 0                                   # tokens whose K/V are cached
    tokens: list[int] = field(default_factory=list)      # tokens fed into the cache, in order


class ModelRunner:
    """Batched, ragged forwards over per-sequence KV caches (one model)."""

    def __init__(self, model, max_seqs: int, max_model_len: int, name: str = "model",
                 prepack: bool | None = None):
        if prepack is None:   # SPECSERVE_PREPACK=0 keeps the stock layers (A/B benchmarks)
            prepack = os.environ.get("SPECSERVE_PREPACK", "1") != "0"
        self.model = model
        # oneDNN-prepacked weights: a forward of 1..9 tokens reads them once (see
        # kernels/specserve_kernels/packed_linear.py for the profile behind this).
        self.prepacked = bool(prepack and can_prepack(model) and prepack_linears(model))
        self.name = name
        self.config = model.config
        self.max_seqs = max_seqs
        self.max_model_len = max_model_len
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.dtype = next(model.parameters()).dtype
        self.device = model.get_input_embeddings().weight.device
        self.sliding_window = self._sliding_window(model.config, max_model_len)
        num_layers = int(getattr(model.config, "num_hidden_layers", None)
                         or getattr(model.config, "n_layer"))
        self.cache = SlotKVCache(num_layers, max_seqs, initial_capacity=min(256, max_model_len + 16))
        self._seqs: dict[object, _Seq] = {}
        self._slot_owner: list[object] = []              # slot -> sequence id (compact)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._lean = None                                # see use_lean_forward
        # One unpadded forward for prompt chunks + verification rows (flat_forward.py);
        # SPECSERVE_FLAT=0 turns it off (A/B benchmarks).
        self.flat = (os.environ.get("SPECSERVE_FLAT", "1") != "0"
                     and supports_flat(model, self.sliding_window))
        self.forward_seconds = 0.0                       # cumulative, for the cost model
        self.forward_calls = 0

    def use_lean_forward(self) -> bool:
        """Run forwards through specserve_kernels.lean_llama when the model is a plain
        Llama (for drafts: their numerics never change what is emitted). Returns whether
        it is on."""
        self._lean = lean_llama_or_none(self.model)
        return self._lean is not None

    def synchronize(self) -> None:
        """Wait for queued device work (GPU kernels run asynchronously): timing needs it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _sliding_window(config, max_model_len: int) -> int | None:
        window = getattr(config, "sliding_window", None)
        if not window or window >= max_model_len:
            return None
        layer_types = getattr(config, "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            raise ModelLoadError(
                "models mixing sliding-window and full-attention layers are supported only "
                f"when max_model_len <= sliding_window ({window}); lower max_model_len")
        return int(window)

    @classmethod
    def from_config(cls, cfg: ModelConfig, max_seqs: int, max_model_len: int, name: str):
        model, tokenizer = load_causal_lm(cfg)
        return cls(model, max_seqs, max_model_len, name=name), tokenizer

    # -- sequences ------------------------------------------------------------------------------
    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def num_seqs(self) -> int:
        return len(self._seqs)

    def add(self, seq_id) -> None:
        if seq_id in self._seqs:
            raise KeyError(f"{self.name}: sequence {seq_id!r} already present")
        if len(self._slot_owner) >= self.max_seqs:
            raise RuntimeError(f"{self.name}: all {self.max_seqs} cache slots are in use")
        self._seqs[seq_id] = _Seq(slot=len(self._slot_owner))
        self._slot_owner.append(seq_id)

    def release(self, seq_id) -> None:
        """Free a sequence's slot; the last live slot moves into it to stay compact."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        last = len(self._slot_owner) - 1
        if seq.slot != last:
            moved_id = self._slot_owner[last]
            moved = self._seqs[moved_id]
            self.cache.move_slot(last, seq.slot, moved.cache_len)
            moved.slot = seq.slot
            self._slot_owner[seq.slot] = moved_id
        self._slot_owner.pop()

    def tokens(self, seq_id) -> list[int]:
        return self._seqs[seq_id].tokens

    def cache_len(self, seq_id) -> int:
        return self._seqs[seq_id].cache_len

    def truncate(self, seq_id, length: int) -> None:
        """Roll a sequence back to its first `length` tokens (free: the rest is masked)."""
        seq = self._seqs[seq_id]
        if length < 0 or length > seq.cache_len:
            raise ValueError(f"cannot truncate {seq_id!r} of length {seq.cache_len} to {length}")
        seq.cache_len = length
        del seq.tokens[length:]

    # -- the forward ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seq_ids: list, new_tokens: list[list[int]], all_logits: bool = True):
        """Append `new_tokens[i]` to sequence `seq_ids[i]` and run one batched forward.

        Returns logits `[B, T, V]` (T = longest new-token list; rows are right-padded and
        their padded positions hold garbage) when `all_logits`, else each row's last valid
        position `[B, V]`. Logits are float32, in the caller's row order.
        """
        if not seq_ids:
            raise ValueError("forward needs at least one sequence")
        seqs = [self._seqs[s] for s in seq_ids]
        for seq, toks in zip(seqs, new_tokens):
            if seq.cache_len + len(toks) > self.max_model_len:
                raise ValueError(f"{self.name}: sequence would exceed max_model_len "
                                 f"{self.max_model_len}")
        # Rows in slot order so that all live rows read the cache as a view.
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].slot)
        batch = pack_ragged([new_tokens[i] for i in order], pad_id=0)
        slots = [seqs[i].slot for i in order]
        cache_lens = [seqs[i].cache_len for i in order]
        t_max = batch.input_ids.shape[1]
        if (self._lean is not None and t_max == 1 and self.sliding_window is None
                and min(cache_lens) == max(cache_lens)):
            # One new token per row, every row as long: each sees all the columns read,
            # so no mask at all (a draft step at batch 1: ~35 us less per token).
            position_ids = torch.full((len(order), 1), cache_lens[0], dtype=torch.long)
            mask, kv_len = None, cache_lens[0] + 1
        else:
            # A boolean mask: SDPA applies it as is (no float mask to build and add).
            position_ids, mask, kv_len = positions_and_mask(
                torch.tensor(cache_lens), batch.num_tokens, t_max, torch.bool,
                self.sliding_window)
        self.cache.plan(slots, cache_lens, t_max, kv_len)
        kwargs = {self._cache_kw: self.cache, "use_cache": True}
        uniform = batch.flat_token_ids.numel() == t_max * len(order)   # no padded positions
        if not all_logits and self._has_logits_to_keep and uniform:
            kwargs["logits_to_keep"] = 1
        start = time.perf_counter()
        if self._lean is not None:
            logits = self._lean(batch.input_ids.to(self.device), position_ids.to(self.device),
                                None if mask is None else mask.to(self.device), self.cache,
                                last_only="logits_to_keep" in kwargs, num_positions=kv_len)
        else:
            logits = self.model(
                input_ids=batch.input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=position_ids.to(self.device),
                **kwargs,
            ).logits
        if logits.dtype != torch.float32:
            logits = logits.float()
        self.forward_seconds += time.perf_counter() - start
        self.forward_calls += 1
        for i in order:
            seqs[i].cache_len += len(new_tokens[i])
            seqs[i].tokens.extend(new_tokens[i])
        if not all_logits:
            if logits.shape[1] == 1:
                logits = logits[:, 0]
            else:
                logits = gather_last(logits, batch.num_tokens.to(logits.device))
        if order != list(range(len(order))):   # back to the caller's row order
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            logits = logits[inverse.to(logits.device)]
        return logits

    @torch.inference_mode()
    def forward_flat(self, seq_ids: list, new_tokens: list[list[int]],
                     keep: list[bool]) -> list[torch.Tensor]:
        """Like `forward`, with no padding (only when `self.flat`): row b's logits at
        all its new positions `[n_b, V]` when `keep[b]`, else at its last `[1, V]`.
        float32, in the caller's row order."""
        if not seq_ids:
            raise ValueError("forward needs at least one sequence")
        seqs = [self._seqs[s] for s in seq_ids]
        for seq, toks in zip(seqs, new_tokens):
            if not toks:
                raise ValueError(f"{self.name}: a row with no new tokens")
            if seq.cache_len + len(toks) > self.max_model_len:
                raise ValueError(f"{self.name}: sequence would exceed max_model_len "
                                 f"{self.max_model_len}")
        start = time.perf_counter()
        logits = flat_forward(self.model, self.cache, [s.slot for s in seqs],
                              [s.cache_len for s in seqs], new_tokens, keep)
        if logits.dtype != torch.float32:
            logits = logits.float()
        self.forward_seconds += time.perf_counter() - start
        self.forward_calls += 1
        for seq, toks in zip(seqs, new_tokens):
            seq.cache_len += len(toks)
            seq.tokens.extend(toks)
        sizes = [len(t) if k else 1 for t, k in zip(new_tokens, keep)]
        return list(torch.split(logits, sizes))
