"""Shared test helpers: tiny random-initialized models of several families, a perturbed
copy as their draft, and in-process engines over them."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from specserve_ray.config import LimitsConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.engine import SpecEngine
from specserve_ray.models.runner import ModelRunner
from specserve_ray.workers.draft import DraftWorker
from specserve_ray.workers.target import TargetWorker


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


class IdTokenizer:
    """Token ids as text; enough for engines fed token-id prompts."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def perturbed(model, noise: float, seed: int = 7):
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std().clamp(min=1e-3))
    return draft


def make_engine(target, draft, k: int = 4, max_seqs: int = 8, tokenizer=None):
    limits = LimitsConfig(max_model_len=256, max_num_seqs=max_seqs, max_tokens=200)
    return SpecEngine(TargetWorker(ModelRunner(target, max_seqs, 256, "target")),
                      DraftWorker(ModelRunner(draft, max_seqs, 256, "draft")) if draft is not None else None,
                      tokenizer or IdTokenizer(), limits, SpeculationConfig(num_speculative_tokens=k))


def random_prompts(n: int, seed: int, vocab: int = 96):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 24, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (m,), generator=g).tolist() for m in lengths]


GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port for a test server, from 20000-31999: above Ray's worker-port
    range (10002-19999) and below the kernel's ephemeral range (32768+), where Ray's own
    services bind port 0. A port picked from the ephemeral range could be taken by Ray
    between this check and Serve's bind (seen: "Failed to bind to address")."""
    import random
    import socket

    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port in 20000-31999")
