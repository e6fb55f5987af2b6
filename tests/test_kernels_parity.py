"""Core vectorized ops vs their loop references, kernels fast paths vs core, exact greedy
cases and errors."""

from __future__ import annotations

import pytest
import torch

from specserve_kernels import greedy_verify
from specserve_ray.core.ragged import gather_last, pack_ragged, positions_and_mask, unpad
from specserve_ray.core.rejection import PLACEHOLDER_TOKEN_ID, rejection_sample
from specserve_ray.core.reference import (
    gather_last_reference,
    pack_ragged_reference,
    positions_and_mask_reference,
    rejection_sample_reference,
    unpad_reference,
)

VOCAB_SIZE = 37
PH = PLACEHOLDER_TOKEN_ID


def _random_probs(generator: torch.Generator, *shape: int, sparsity: float = 0.3) -> torch.Tensor:
    """Random distributions over the last dim, some entries exactly 0 (like top-k output)."""
    weights = torch.rand(*shape, generator=generator) ** 3
    weights = weights * (torch.rand(*shape, generator=generator) > sparsity)
    weights[..., 0] += 1e-3  # never an all-zero row
    return weights / weights.sum(dim=-1, keepdim=True)


def _random_verify_inputs(seed: int, batch_size: int, num_draft_slots: int, greedy_mode: str) -> dict:
    generator = torch.Generator().manual_seed(seed)
    vocab = VOCAB_SIZE
    num_draft_tokens = torch.randint(0, num_draft_slots + 1, (batch_size,), generator=generator)
    if batch_size > 1:
        num_draft_tokens[0] = 0  # always exercise an empty-draft row
        num_draft_tokens[-1] = num_draft_slots
    target_probs = _random_probs(generator, batch_size, num_draft_slots + 1, vocab)
    draft_probs = _random_probs(generator, batch_size, num_draft_slots, vocab)
    # Some positions where draft == target: exercises the zero-residual fallback.
    same_as_target = torch.rand(batch_size, num_draft_slots, generator=generator) < 0.2
    draft_probs = torch.where(same_as_target.unsqueeze(-1), target_probs[:, :num_draft_slots], draft_probs)
    target_argmax = target_probs.argmax(dim=-1)

    # Sampled rows draw drafts from draft_probs; greedy rows copy the target argmax for a
    # random prefix so that partial acceptance happens often.
    sampled_drafts = torch.multinomial(
        draft_probs.reshape(-1, vocab), 1, generator=generator
    ).view(batch_size, num_draft_slots) if num_draft_slots else torch.zeros(batch_size, 0, dtype=torch.long)
    greedy_prefix = torch.randint(0, num_draft_slots + 1, (batch_size,), generator=generator)
    random_ids = torch.randint(0, vocab, (batch_size, num_draft_slots), generator=generator)
    positions = torch.arange(num_draft_slots)
    in_prefix = positions < greedy_prefix.unsqueeze(-1)
    greedy_drafts = torch.where(in_prefix, target_argmax[:, :num_draft_slots], random_ids)

    if greedy_mode == "all":
        is_greedy = torch.ones(batch_size, dtype=torch.bool)
    elif greedy_mode == "none":
        is_greedy = torch.zeros(batch_size, dtype=torch.bool)
    else:
        is_greedy = torch.rand(batch_size, generator=generator) < 0.5
    draft_token_ids = torch.where(is_greedy.unsqueeze(-1), greedy_drafts, sampled_drafts)
    draft_token_ids = torch.where(positions < num_draft_tokens.unsqueeze(-1), draft_token_ids, PH)

    return dict(
        draft_token_ids=draft_token_ids,
        num_draft_tokens=num_draft_tokens,
        draft_probs=draft_probs,
        target_probs=target_probs,
        target_argmax=target_argmax,
        is_greedy=is_greedy,
        uniform_samples=torch.rand(batch_size, num_draft_slots, generator=generator),
        exponential_noise=torch.empty(batch_size, vocab).exponential_(generator=generator),
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("num_draft_slots", [0, 1, 4, 8])
@pytest.mark.parametrize("greedy_mode", ["all", "none", "mixed"])
def test_rejection_sample_matches_reference(seed, batch_size, num_draft_slots, greedy_mode):
    inputs = _random_verify_inputs(seed, batch_size, num_draft_slots, greedy_mode)
    output_ids, num_emitted = rejection_sample(**inputs)
    expected_ids, expected_emitted = rejection_sample_reference(**inputs)
    assert output_ids.dtype == torch.long and num_emitted.dtype == torch.long
    assert output_ids.shape == (batch_size, num_draft_slots + 1)
    torch.testing.assert_close(num_emitted, expected_emitted, rtol=0, atol=0)
    torch.testing.assert_close(output_ids, expected_ids, rtol=0, atol=0)
    assert bool((num_emitted >= 1).all() and (num_emitted <= inputs["num_draft_tokens"] + 1).all())


def test_greedy_path_needs_no_probs():
    inputs = _random_verify_inputs(0, 8, 4, "all")
    expected = rejection_sample_reference(**inputs)
    for name in ("draft_probs", "target_probs", "uniform_samples", "exponential_noise"):
        inputs[name] = None
    output_ids, num_emitted = rejection_sample(**inputs)
    assert torch.equal(output_ids, expected[0]) and torch.equal(num_emitted, expected[1])


def test_sampled_rows_without_probs_raise():
    inputs = _random_verify_inputs(0, 4, 3, "none")
    inputs["target_probs"] = None
    with pytest.raises(ValueError):
        rejection_sample(**inputs)


@pytest.mark.parametrize("implementation", [rejection_sample, rejection_sample_reference])
def test_zero_residual_falls_back_to_target(implementation):
    # Draft mass above the target everywhere (as rounding can cause): a rejection then
    # leaves an all-zero residual, and the final token must come from the target.
    generator = torch.Generator().manual_seed(3)
    target_probs = _random_probs(generator, 4, 2, VOCAB_SIZE)
    draft_probs = target_probs[:, :1] * 1.01
    draft_token_ids = target_probs[:, 0].argmax(-1, keepdim=True)
    noise = torch.empty(4, VOCAB_SIZE).exponential_(generator=generator)
    output_ids, num_emitted = implementation(
        draft_token_ids=draft_token_ids,
        num_draft_tokens=torch.ones(4, dtype=torch.long),
        draft_probs=draft_probs,
        target_probs=target_probs,
        target_argmax=target_probs.argmax(-1),
        is_greedy=torch.zeros(4, dtype=torch.bool),
        uniform_samples=torch.full((4, 1), 0.999),
        exponential_noise=noise,
    )
    assert num_emitted.tolist() == [1] * 4
    assert output_ids[:, 0].tolist() == torch.argmax(target_probs[:, 0] / noise, dim=-1).tolist()


@pytest.mark.parametrize("implementation", [rejection_sample, rejection_sample_reference])
def test_token_forbidden_by_target_is_never_accepted(implementation):
    # u == 0 makes u * q <= p hold even when p == 0; a token the target filtered out
    # (e.g. by top-k) must still be rejected, and the recovered token must be allowed.
    target_probs = torch.tensor([[[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]])
    draft_probs = torch.tensor([[[1.0, 0.0, 0.0]]])
    output_ids, num_emitted = implementation(
        draft_token_ids=torch.tensor([[0]]),
        num_draft_tokens=torch.tensor([1]),
        draft_probs=draft_probs,
        target_probs=target_probs,
        target_argmax=torch.tensor([[1, 2]]),
        is_greedy=torch.tensor([False]),
        uniform_samples=torch.zeros(1, 1),
        exponential_noise=torch.ones(1, 3),
    )
    assert num_emitted.tolist() == [1]
    assert output_ids[0, 0].item() in (1, 2)


# (drafts, num_draft_tokens, target_argmax, expected output, expected num_emitted), K = 3
GREEDY_CASES = {
    "all_match_then_bonus": ([5, 6, 7], 3, [5, 6, 7, 9], [5, 6, 7, 9], 4),
    "mismatch_at_0": ([1, 6, 7], 3, [5, 6, 7, 9], [5, PH, PH, PH], 1),
    "mismatch_at_1": ([5, 1, 7], 3, [5, 6, 7, 9], [5, 6, PH, PH], 2),
    "mismatch_at_last": ([5, 6, 1], 3, [5, 6, 7, 9], [5, 6, 7, PH], 3),
    "single_draft_rejected": ([2, PH, PH], 1, [5, 6, 7, 9], [5, PH, PH, PH], 1),
    "short_row_all_match": ([5, 6, PH], 2, [5, 6, 3, 9], [5, 6, 3, PH], 3),
    "no_drafts": ([PH, PH, PH], 0, [4, 6, 7, 9], [4, PH, PH, PH], 1),
}


@pytest.mark.parametrize("case", GREEDY_CASES.values(), ids=GREEDY_CASES.keys())
@pytest.mark.parametrize("implementation", [rejection_sample, rejection_sample_reference])
def test_greedy_exact_cases(case, implementation):
    drafts, num_drafts, argmax, expected_ids, expected_emitted = case
    output_ids, num_emitted = implementation(
        draft_token_ids=torch.tensor([drafts]),
        num_draft_tokens=torch.tensor([num_drafts]),
        draft_probs=None,
        target_probs=None,
        target_argmax=torch.tensor([argmax]),
        is_greedy=torch.tensor([True]),
        uniform_samples=None,
        exponential_noise=None,
    )
    assert output_ids.tolist() == [expected_ids]
    assert num_emitted.tolist() == [expected_emitted]


def test_greedy_cases_batched_together():
    # All table rows in one batch: every row resolves independently of the others.
    cases = list(GREEDY_CASES.values())
    output_ids, num_emitted = rejection_sample(
        draft_token_ids=torch.tensor([case[0] for case in cases]),
        num_draft_tokens=torch.tensor([case[1] for case in cases]),
        draft_probs=None,
        target_probs=None,
        target_argmax=torch.tensor([case[2] for case in cases]),
        is_greedy=torch.ones(len(cases), dtype=torch.bool),
        uniform_samples=None,
        exponential_noise=None,
    )
    assert output_ids.tolist() == [case[3] for case in cases]
    assert num_emitted.tolist() == [case[4] for case in cases]


def test_zero_draft_slots_is_plain_decoding():
    generator = torch.Generator().manual_seed(7)
    batch_size = 5
    target_probs = _random_probs(generator, batch_size, 1, VOCAB_SIZE)
    noise = torch.empty(batch_size, VOCAB_SIZE).exponential_(generator=generator)
    is_greedy = torch.tensor([True, False, True, False, False])
    output_ids, num_emitted = rejection_sample(
        draft_token_ids=torch.zeros(batch_size, 0, dtype=torch.long),
        num_draft_tokens=torch.zeros(batch_size, dtype=torch.long),
        draft_probs=None,
        target_probs=target_probs,
        target_argmax=target_probs.argmax(-1),
        is_greedy=is_greedy,
        uniform_samples=torch.zeros(batch_size, 0),
        exponential_noise=noise,
    )
    sampled = torch.argmax(target_probs[:, 0] / noise, dim=-1)
    expected = torch.where(is_greedy, target_probs[:, 0].argmax(-1), sampled)
    assert output_ids.shape == (batch_size, 1)
    assert output_ids[:, 0].tolist() == expected.tolist()
    assert num_emitted.tolist() == [1] * batch_size


# ---------------------------------------------------------------- ragged inputs


def _random_token_lists(seed: int, batch_size: int, max_len: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch_size,), generator=generator).tolist()
    return [torch.randint(0, 100, (length,), generator=generator).tolist() for length in lengths]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_pack_ragged_matches_reference(seed, batch_size):
    token_lists = _random_token_lists(seed, batch_size, max_len=6)
    packed = pack_ragged(token_lists, pad_id=-7)
    expected = pack_ragged_reference(token_lists, pad_id=-7)
    for field in ("input_ids", "num_tokens", "cu_seqlens", "flat_token_ids"):
        actual_value, expected_value = getattr(packed, field), getattr(expected, field)
        assert actual_value.dtype == torch.long
        assert torch.equal(actual_value, expected_value), field
    assert packed.max_tokens == max(len(tokens) for tokens in token_lists)


@pytest.mark.parametrize("token_lists", [[[5]], [[3], [9], [4]], [[2, 7], [1, 1]]],
                         ids=["one_token", "one_token_rows", "uniform_rows"])
def test_pack_ragged_fast_shapes_match_reference(token_lists):
    packed = pack_ragged(token_lists, pad_id=0)
    expected = pack_ragged_reference(token_lists, pad_id=0)
    for field in ("input_ids", "num_tokens", "cu_seqlens", "flat_token_ids"):
        assert torch.equal(getattr(packed, field), getattr(expected, field)), field


@pytest.mark.parametrize(
    "token_lists", [[[1, 2], []], [[]], []], ids=["second_empty", "only_empty", "no_rows"]
)
def test_pack_ragged_rejects_empty(token_lists):
    with pytest.raises(ValueError):
        pack_ragged(token_lists, pad_id=0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("batch_size", [1, 5, 8])
@pytest.mark.parametrize("sliding_window", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_and_mask_matches_reference(seed, batch_size, sliding_window, dtype):
    generator = torch.Generator().manual_seed(seed)
    max_tokens = 4
    cache_lens = torch.randint(0, 7, (batch_size,), generator=generator)
    num_tokens = torch.randint(1, max_tokens + 1, (batch_size,), generator=generator)
    position_ids, mask, kv_len = positions_and_mask(cache_lens, num_tokens, max_tokens, dtype, sliding_window)
    expected_positions, expected_mask, expected_kv = positions_and_mask_reference(
        cache_lens, num_tokens, max_tokens, dtype, sliding_window
    )
    assert kv_len == expected_kv == int(cache_lens.max()) + max_tokens
    assert mask.dtype == dtype and mask.shape == (batch_size, 1, max_tokens, kv_len)
    assert torch.equal(position_ids, expected_positions)
    assert torch.equal(mask, expected_mask)
    # No query row (padding included) may be fully masked: softmax would be NaN.
    assert bool((mask == 0).any(dim=-1).all())


def test_mask_small_example():
    # Row 0: cache of 2, row 1: empty cache. T = 2, so KV = 4.
    position_ids, mask, kv_len = positions_and_mask(
        torch.tensor([2, 0]), torch.tensor([2, 1]), 2, torch.float32, sliding_window=2
    )
    assert kv_len == 4
    assert position_ids.tolist() == [[2, 3], [0, 1]]
    visible = (mask[:, 0] == 0).int().tolist()
    assert visible == [[[0, 1, 1, 0], [0, 0, 1, 1]], [[1, 0, 0, 0], [1, 1, 0, 0]]]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("trailing_shape", [(), (3,), (2, 5)])
def test_unpad_and_gather_last_match_reference(seed, trailing_shape):
    generator = torch.Generator().manual_seed(seed)
    batch_size, max_tokens = 6, 5
    num_tokens = torch.randint(1, max_tokens + 1, (batch_size,), generator=generator)
    values = torch.randn(batch_size, max_tokens, *trailing_shape, generator=generator)
    flat = unpad(values, num_tokens)
    assert flat.shape == (int(num_tokens.sum()), *trailing_shape)
    assert torch.equal(flat, unpad_reference(values, num_tokens))
    last = gather_last(values, num_tokens)
    assert last.shape == (batch_size, *trailing_shape)
    assert torch.equal(last, gather_last_reference(values, num_tokens))


def test_pack_then_unpad_roundtrip():
    token_lists = [[3, 1, 4], [1], [5, 9]]
    packed = pack_ragged(token_lists, pad_id=0)
    assert torch.equal(unpad(packed.input_ids, packed.num_tokens), packed.flat_token_ids)
    assert gather_last(packed.input_ids, packed.num_tokens).tolist() == [4, 1, 9]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_verify_fast_path_matches_rejection_sample(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, k = 5, 4
    logits = torch.randn(batch, k + 1, VOCAB_SIZE, generator=gen)
    argmax = logits.argmax(-1)
    num_draft = torch.randint(0, k + 1, (batch,), generator=gen)
    # Drafts that agree with the target for a random prefix, then disagree.
    agree = torch.randint(0, k + 1, (batch,), generator=gen)
    drafts = torch.where(torch.arange(k) < agree.unsqueeze(1), argmax[:, :k], (argmax[:, :k] + 1) % VOCAB_SIZE)
    drafts = torch.where(torch.arange(k) < num_draft.unsqueeze(1), drafts, PH)
    expected = rejection_sample(drafts, num_draft, None, None, argmax, torch.ones(batch, dtype=torch.bool),
                                None, None)
    got = greedy_verify(drafts, num_draft, logits)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # A wrong kernel (accepting one token too many) must fail the same comparison.
    assert not torch.equal(expected[1] + 1, got[1])
