"""The embedded pair: loads like a hub model, and speculation on it is exact.

fp32: token-for-token equality with target-only greedy decoding (Hugging Face generate).
bf16: tie-aware — a divergence is allowed only where the target's top two logits are
within bf16 rounding of each other (scoring k+1 tokens in one pass rounds differently
from scoring one at a time).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specserve_ray.config import (EMBEDDED_DRAFT, EMBEDDED_PAIR_DIR, EMBEDDED_TARGET, EngineConfig,
                                  LimitsConfig, ModelConfig)
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.engine import SpecEngine
from specserve_ray.prompts import held_out_prompts

NEW_TOKENS = 32


def test_pair_files_and_budget():
    total = 0
    for role in ("target", "draft"):
        d = Path(EMBEDDED_PAIR_DIR) / role
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (d / name).is_file(), d / name
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total <= 64 * 2**20, f"committed pair is {total / 2**20:.1f} MiB"
    t = AutoTokenizer.from_pretrained(EMBEDDED_TARGET)
    assert t.get_vocab() == AutoTokenizer.from_pretrained(EMBEDDED_DRAFT).get_vocab()


def _engine(dtype: str, max_seqs: int = 8) -> SpecEngine:
    return SpecEngine.from_config(EngineConfig(
        target=ModelConfig(path=EMBEDDED_TARGET, dtype=dtype),
        draft=ModelConfig(path=EMBEDDED_DRAFT, dtype="float32"),
        limits=LimitsConfig(max_model_len=512, max_num_seqs=max_seqs)))


@pytest.fixture(scope="module")
def fp32_engine():
    return _engine("float32")


@pytest.fixture(scope="module")
def prompts(fp32_engine):
    return held_out_prompts(fp32_engine.tokenizer, 8, 48)


@pytest.fixture(scope="module")
def reference(fp32_engine, prompts):
    model = fp32_engine.target.runner.model
    refs = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False)
            refs.append(out[0, len(p):].tolist())
    return refs


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8])
def test_fp32_batch1_equals_target_only(fp32_engine, prompts, reference, k):
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for i in (k % 8, (k + 3) % 8):
        out = fp32_engine.generate([prompts[i]], params, num_speculative_tokens=[k])[0]
        assert out.output_ids == reference[i], (k, i)


def test_fp32_batch8_mixed_k_equals_target_only(fp32_engine, prompts, reference):
    before = fp32_engine.totals.num_accepted_tokens
    outs = fp32_engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
                                num_speculative_tokens=[1, 2, 3, 4, 5, 6, 7, 8])
    for out, ref in zip(outs, reference):
        assert out.output_ids == ref
    assert fp32_engine.totals.num_accepted_tokens > before   # the draft is useful


def _near_tie(logits: torch.Tensor) -> bool:
    top2 = torch.topk(logits.float(), 2).values
    # bf16 keeps 8 significant bits: a few units in the last place at the logit's size.
    ulp = 2.0 ** (torch.floor(torch.log2(top2[0].abs().clamp(min=1e-3))) - 7)
    return bool(top2[0] - top2[1] <= 4 * ulp)


def test_bf16_tie_aware(prompts):
    engine = _engine("bfloat16")
    model = engine.target.runner.model
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
                           num_speculative_tokens=[4] * len(prompts))
    exact = 0
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            gen = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        ref = gen.sequences[0, len(p):].tolist()
        if out.output_ids == ref:
            exact += 1
            continue
        first = next(i for i, (a, b) in enumerate(zip(out.output_ids, ref)) if a != b)
        assert _near_tie(gen.logits[first][0]), (
            f"bf16 divergence at token {first} without a near-tie in the target's logits")
    assert exact >= len(prompts) // 2
