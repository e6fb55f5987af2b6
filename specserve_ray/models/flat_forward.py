"""One forward over ragged rows without padding: prompt chunks and verification rows together.

Why: on a CPU the target's forward costs about a fixed weight pass plus a per-token
compute (measured on the embedded fp32 target, 2 cores: ~17 ms + ~0.37 ms per token).
A step that verifies the running rows and prefills a prompt chunk in two forwards pays
the fixed part twice; one padded forward would instead pay the chunk's width on every
verification row. Here every projection, MLP and the LM head run once over the rows'
tokens concatenated (`[1, N, D]`, no padding); only attention, which must see each row's
own cache, runs per row.

Numerics: the same Hugging Face modules (norms, projections, rotary table, MLP, LM head)
and the same SDPA attention function; a row's attention reads exactly its own keys
(cache + new) instead of a padded, masked width. Greedy output is tested identical to
Hugging Face greedy decoding (tests/test_chunked_prefill.py).

Supported: Llama-shaped models (`model.model.layers[i].self_attn.{q,k,v,o}_proj`, no
q/k norms, no sliding window); `supports_flat` says whether a model is one.
"""
from __future__ import annotations

import torch

from specserve_ray.models.kv_cache import SlotKVCache

_FLAT_TYPES = {"llama", "mistral", "qwen2"}


def supports_flat(model, sliding_window: int | None) -> bool:
    cfg = model.config
    inner = getattr(model, "model", None)
    if (getattr(cfg, "model_type", None) not in _FLAT_TYPES or sliding_window is not None
            or inner is None or not hasattr(inner, "rotary_emb")):
        return False
    attn = inner.layers[0].self_attn
    return (all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and not hasattr(attn, "q_norm"))


@torch.inference_mode()
def flat_forward(model, cache: SlotKVCache, slots: list[int], cache_lens: list[int],
                 new_tokens: list[list[int]], keep: list[bool]) -> torch.Tensor:
    """Append `new_tokens[b]` to slot `slots[b]` (holding `cache_lens[b]` tokens) in one
    forward. Returns the logits of every kept position, rows in order: for row b, all of
    its positions when `keep[b]`, else only its last one. Shape `[P, V]`, model dtype.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    inner = model.model
    device = inner.embed_tokens.weight.device
    lengths = [len(t) for t in new_tokens]
    flat_ids = torch.tensor([t for row in new_tokens for t in row], dtype=torch.long,
                            device=device)
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cache_lens, lengths)])
    positions = positions.to(device).unsqueeze(0)                                # [1, N]
    cache.reserve(max(c + n for c, n in zip(cache_lens, lengths)))
    # Each row's boolean mask (True = may attend): query q at position c + q sees key
    # columns <= c + q of its own slot, exactly what the padded path's mask allows.
    masks = []
    for c, n in zip(cache_lens, lengths):
        cols = torch.arange(c + n, device=device)
        masks.append((cols.unsqueeze(0) <= (c + torch.arange(n, device=device)).unsqueeze(1))
                     .view(1, 1, n, c + n))
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)

    hidden = inner.embed_tokens(flat_ids).unsqueeze(0)                           # [1, N, D]
    cos_sin = inner.rotary_emb(hidden, position_ids=positions)
    for layer_idx, layer in enumerate(inner.layers):
        residual = hidden
        x = layer.input_layernorm(hidden)
        attn = layer.self_attn
        shape = (1, x.shape[1], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)                         # [1, H, N, d]
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = _rotary(q, k, *cos_sin)
        outs = []
        for b, (slot, c, n) in enumerate(zip(slots, cache_lens, lengths)):
            lo, hi = offsets[b], offsets[b + 1]
            keys, values = cache.write_and_read(layer_idx, slot, c, k[:, :, lo:hi],
                                                v[:, :, lo:hi])                 # [1, Hkv, c+n, d]
            out, _ = sdpa_attention_forward(attn, q[:, :, lo:hi], keys, values, masks[b],
                                            dropout=0.0, scaling=attn.scaling)  # [1, n, H, d]
            outs.append(out)
        attn_out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        hidden = residual + attn.o_proj(attn_out.reshape(1, x.shape[1], -1).contiguous())
        residual = hidden
        hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = inner.norm(hidden)[0]                                               # [N, D]
    rows = [torch.arange(lo, hi) if kept else torch.tensor([hi - 1])
            for lo, hi, kept in zip(offsets[:-1], offsets[1:], keep)]
    picked = torch.cat(rows).to(device)
    return model.lm_head(hidden.index_select(0, picked))                          # [P, V]


def _rotary(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)
