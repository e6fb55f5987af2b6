"""Parity of the step loop's CPU fast paths with the plain computations they replace."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from specserve_kernels.packed_linear import PackedLinear, prepack_linears
from specserve_ray.config import EMBEDDED_TARGET, ModelConfig
from specserve_ray.core.ragged import pack_ragged, positions_and_mask
from specserve_ray.core.reference import pack_ragged_reference
from specserve_ray.core.sampling import greedy_with_confidence, logits_to_probs
from specserve_ray.models.kv_cache import SlotKVCache
from specserve_ray.models.runner import ModelRunner, load_causal_lm


@pytest.mark.parametrize("rows", [1, 3, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_linear(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(512, 384, bias=True).to(dtype).requires_grad_(False)
    packed = PackedLinear(linear)
    x = torch.randn(2, rows, 512, generator=gen).to(dtype)
    with torch.inference_mode():
        got, want = packed(x), linear(x)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert packed.weight is linear.weight                      # tied weights stay tied


def test_prepack_replaces_only_wide_layers():
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(128, 512), nn.Linear(512, 4096))
    assert prepack_linears(model) == 2
    assert [type(m) for m in model] == [PackedLinear, nn.Linear, PackedLinear]


def test_bool_mask_is_the_float_masks_visibility():
    cache_lens, num_tokens = torch.tensor([3, 0, 5]), torch.tensor([2, 4, 1])
    for window in (None, 2):
        pos_f, mask_f, kv_f = positions_and_mask(cache_lens, num_tokens, 4, torch.float32, window)
        pos_b, mask_b, kv_b = positions_and_mask(cache_lens, num_tokens, 4, torch.bool, window)
        assert kv_b == kv_f and torch.equal(pos_b, pos_f)
        assert mask_b.dtype == torch.bool and torch.equal(mask_b, mask_f == 0)


def test_pack_ragged_uniform_rows_match_reference():
    token_lists = [[4, 5, 6], [7, 8, 9]]
    packed, ref = pack_ragged(token_lists, pad_id=0), pack_ragged_reference(token_lists, pad_id=0)
    for field in ("input_ids", "num_tokens", "cu_seqlens", "flat_token_ids"):
        assert torch.equal(getattr(packed, field), getattr(ref, field)), field


def test_greedy_with_confidence_matches_softmax():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(1)) * 4
    tokens, conf = greedy_with_confidence(logits)
    n = logits.shape[0]
    probs = logits_to_probs(logits, torch.zeros(n), torch.zeros(n, dtype=torch.long), torch.ones(n))
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(conf, probs.gather(1, tokens[:, None])[:, 0])


def test_rectangular_cache_write_equals_scatter():
    gen = torch.Generator().manual_seed(0)
    k_new, v_new = torch.randn(2, 2, 3, 4, generator=gen), torch.randn(2, 2, 3, 4, generator=gen)
    block, scatter = SlotKVCache(1, 4, 8), SlotKVCache(1, 4, 8)
    block.plan([1, 2], [5, 5], 3, 8)                   # contiguous rows, same length
    assert block._write_block is not None
    block.update(k_new, v_new, 0)
    scatter.plan([1, 2], [5, 5], 3, 8)
    scatter._write_block = None                         # force the general path
    scatter._write_rows = torch.tensor([[1] * 3, [2] * 3])
    scatter._write_cols = torch.tensor([[5, 6, 7]] * 2)
    scatter.update(k_new, v_new, 0)
    assert torch.equal(block.keys[0], scatter.keys[0])
    assert torch.equal(block.values[0], scatter.values[0])
    assert torch.equal(block.keys[0][1:3, :, 5:8], k_new)


@pytest.mark.parametrize("num_new", [1, 5])
def test_prepacked_runner_matches_stock_hf_forward(num_new):
    """The embedded target through the prepacked runner vs an untouched HF forward."""
    torch.manual_seed(0)
    cfg = ModelConfig(path=EMBEDDED_TARGET, dtype="float32")
    stock = load_causal_lm(cfg)[0]
    runner = ModelRunner(load_causal_lm(cfg)[0], 2, 256, prepack=True)
    assert runner.prepacked
    prompt = torch.randint(1, 4000, (40,)).tolist()
    runner.add("a")
    runner.forward(["a"], [prompt[:-num_new]], all_logits=False)
    got = runner.forward(["a"], [prompt[-num_new:]])[0]          # [T, V]
    with torch.inference_mode():
        want = stock(input_ids=torch.tensor([prompt])).logits[0, -num_new:]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_lean_llama_draft_forward_matches_hf():
    from specserve_kernels.lean_llama import lean_llama_or_none
    from specserve_ray.config import EMBEDDED_DRAFT

    model = load_causal_lm(ModelConfig(path=EMBEDDED_DRAFT, dtype="float32"))[0]
    runner = ModelRunner(model, 2, 256, prepack=False)
    assert runner.use_lean_forward()
    ids = torch.randint(1, 4000, (2, 30), generator=torch.Generator().manual_seed(3)).tolist()
    runner.add("a"), runner.add("b")
    runner.forward(["a", "b"], [ids[0][:20], ids[1][:25]], all_logits=False)
    got = runner.forward(["a", "b"], [ids[0][20:], ids[1][25:]])       # ragged: 10 and 5
    with torch.inference_mode():
        want_a = model(input_ids=torch.tensor([ids[0]])).logits[0, 20:]
        want_b = model(input_ids=torch.tensor([ids[1]])).logits[0, 25:]
    torch.testing.assert_close(got[0], want_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, :5], want_b, rtol=1e-4, atol=1e-4)
    assert lean_llama_or_none(load_causal_lm(ModelConfig(path=EMBEDDED_DRAFT))[0]) is not None


def test_lean_llama_rotary_table_grows_and_one_token_rows_skip_the_mask():
    """Positions past the first rotary table (256 rows) and the unmasked one-token path
    (rows of equal length) give the same logits as Hugging Face's forward."""
    from specserve_ray.config import EMBEDDED_DRAFT

    model = load_causal_lm(ModelConfig(path=EMBEDDED_DRAFT, dtype="float32"))[0]
    runner = ModelRunner(model, 2, 600, prepack=False)
    assert runner.use_lean_forward()
    ids = torch.randint(1, 4000, (2, 303), generator=torch.Generator().manual_seed(5)).tolist()
    runner.add("a"), runner.add("b")
    runner.forward(["a", "b"], [ids[0][:300], ids[1][:300]], all_logits=False)
    steps = [runner.forward(["a", "b"], [[ids[0][i]], [ids[1][i]]], all_logits=False)
             for i in range(300, 303)]                               # [2, V] each, no mask
    with torch.inference_mode():
        want = model(input_ids=torch.tensor(ids)).logits[:, 300:]     # [2, 3, V]
    for i, got in enumerate(steps):
        torch.testing.assert_close(got, want[:, i], rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want[:, i].argmax(-1))
