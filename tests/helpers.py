"""Shared test fixtures: tiny random-initialized models of several families, saved locally."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_config(family: str, vocab: int = 96, seed: int = 0):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mistral":
        return MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                          bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, vocab: int = 96, scale: float = 1.0):
    """A random model whose logits are spread enough that argmax ties are vanishingly rare."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    return model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Target-only greedy reference: Hugging Face generate, batch 1, no speculation."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
