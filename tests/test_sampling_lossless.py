"""Statistical checks that rejection sampling is lossless, plus logits_to_probs tests.

Lossless means: whatever the draft proposes, emitted tokens are distributed exactly as
the target would have sampled them. We check this on a tiny vocabulary with many
independent rows in one batched call, against a total-variation (TV) bound that
follows from the sample size:
  E[TV] <= 1/2 * sum_i sqrt(p_i (1 - p_i) / n), and TV moves by at most 1/n per
  sample, so by McDiarmid TV > E[TV] + sqrt(ln(1/delta) / (2n)) has prob <= delta.
All generators are seeded, so the tests are deterministic; the bound is what makes
the chosen tolerance meaningful rather than tuned.
"""

from __future__ import annotations

import math

import pytest
import torch

from specserve_ray.core.rejection import rejection_sample
from specserve_ray.core.sampling import logits_to_probs, logits_to_probs_reference, sample_from_probs

VOCAB_SIZE = 8
NUM_ROWS = 20_000
NUM_DRAFT_SLOTS = 2
FALSE_ALARM_PROB = 1e-6


def _tv(probs_a: torch.Tensor, probs_b: torch.Tensor) -> float:
    return 0.5 * float((probs_a.double() - probs_b.double()).abs().sum())


def _concentration(num_samples: int) -> float:
    return math.sqrt(math.log(1 / FALSE_ALARM_PROB) / (2 * num_samples))


def _tv_bound(expected_probs: torch.Tensor, num_samples: int) -> float:
    """High-probability bound on TV(empirical of num_samples draws, expected_probs)."""
    spread = (expected_probs.double() * (1 - expected_probs.double()) / num_samples).sqrt().sum()
    return 0.5 * float(spread) + _concentration(num_samples)


def _conditional_tv_bound(
    context_counts: torch.Tensor,  # [C] how many samples saw each context
    conditional_probs: torch.Tensor,  # [C, V] expected next-token probs per context
) -> float:
    """Bound on TV(empirical joint, empirical context marginal x conditional_probs)."""
    num_samples = int(context_counts.sum())
    spread = 0.0
    for count, probs in zip(context_counts.tolist(), conditional_probs.double()):
        if count:
            spread += count / num_samples * 0.5 * float((probs * (1 - probs) / count).sqrt().sum())
    return spread + _concentration(num_samples)


def _histogram(token_ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    return torch.bincount(token_ids, minlength=num_bins).double() / max(token_ids.numel(), 1)


def _peaked_probs(generator: torch.Generator, *shape: int) -> torch.Tensor:
    # Peaked random distributions, so draft and target differ substantially.
    return torch.softmax(2.0 * torch.randn(*shape, generator=generator), dim=-1)


def _noise(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.empty(*shape).exponential_(generator=generator)


class ToyPair:
    """Context-dependent toy target and draft over a tiny vocabulary.

    Position 0 has fixed distributions; at positions 1 and 2 the distribution depends
    on the previous token (a [V, V] table), as a real model's would.
    """

    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.target_first = _peaked_probs(generator, VOCAB_SIZE)  # [V]
        self.target_next = _peaked_probs(generator, VOCAB_SIZE, VOCAB_SIZE)  # [V(prev), V]
        self.target_bonus = _peaked_probs(generator, VOCAB_SIZE, VOCAB_SIZE)  # [V(prev), V]
        # A draft is a rough approximation of its target: half target, half unrelated.
        # That keeps acceptance common (every path is exercised) while the draft is
        # still far from the target in TV.
        self.draft_first = 0.5 * self.target_first + 0.5 * _peaked_probs(generator, VOCAB_SIZE)
        self.draft_next = 0.5 * self.target_next + 0.5 * _peaked_probs(generator, VOCAB_SIZE, VOCAB_SIZE)

    def verify_inputs(self, generator: torch.Generator, num_draft_tokens: torch.Tensor) -> dict:
        draft_token_0 = sample_from_probs(
            self.draft_first.expand(NUM_ROWS, VOCAB_SIZE), _noise(generator, NUM_ROWS, VOCAB_SIZE)
        )
        draft_token_1 = sample_from_probs(
            self.draft_next[draft_token_0], _noise(generator, NUM_ROWS, VOCAB_SIZE)
        )
        draft_token_ids = torch.stack([draft_token_0, draft_token_1], dim=1)
        positions = torch.arange(NUM_DRAFT_SLOTS)
        draft_token_ids = torch.where(positions < num_draft_tokens.unsqueeze(-1), draft_token_ids, -1)
        draft_probs = torch.stack(
            [self.draft_first.expand(NUM_ROWS, VOCAB_SIZE), self.draft_next[draft_token_0]], dim=1
        )
        # The bonus position's context is the last *drafted* token of the row.
        last_draft = torch.where(num_draft_tokens >= 2, draft_token_1, draft_token_0)
        target_probs = torch.stack(
            [
                self.target_first.expand(NUM_ROWS, VOCAB_SIZE),
                self.target_next[draft_token_0],
                self.target_bonus[last_draft],
            ],
            dim=1,
        )
        return dict(
            draft_token_ids=draft_token_ids,
            num_draft_tokens=num_draft_tokens,
            draft_probs=draft_probs,
            target_probs=target_probs,
            target_argmax=target_probs.argmax(-1),
            is_greedy=torch.zeros(NUM_ROWS, dtype=torch.bool),
            uniform_samples=torch.rand(NUM_ROWS, NUM_DRAFT_SLOTS, generator=generator),
            exponential_noise=_noise(generator, NUM_ROWS, VOCAB_SIZE),
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_rejection_sampling_is_lossless(seed):
    pair = ToyPair(seed)
    generator = torch.Generator().manual_seed(100 + seed)
    num_draft_tokens = torch.full((NUM_ROWS,), NUM_DRAFT_SLOTS)
    inputs = pair.verify_inputs(generator, num_draft_tokens)
    output_ids, num_emitted = rejection_sample(**inputs)

    # Every path must actually occur for this test to mean anything.
    accepted_first = num_emitted >= 2
    rejected_first = num_emitted == 1  # final token at position 0 is a recovered token
    got_bonus = num_emitted == NUM_DRAFT_SLOTS + 1
    for path_rows in (accepted_first, rejected_first, got_bonus, num_emitted == 2):
        assert int(path_rows.sum()) > 1000

    # First emitted token follows the target, and is far from the draft.
    first_hist = _histogram(output_ids[:, 0], VOCAB_SIZE)
    bound = _tv_bound(pair.target_first, NUM_ROWS)
    assert _tv(first_hist, pair.target_first) < bound
    assert _tv(pair.draft_first, pair.target_first) > 5 * bound
    assert _tv(first_hist, pair.draft_first) > 4 * bound

    # Recovered tokens follow the normalized residual max(0, p - q).
    residual = (pair.target_first - pair.draft_first).clamp_min(0)
    residual /= residual.sum()
    recovered_hist = _histogram(output_ids[rejected_first, 0], VOCAB_SIZE)
    assert _tv(recovered_hist, residual) < _tv_bound(residual, int(rejected_first.sum()))

    # Given the first token was accepted as x, the second emitted token follows
    # target_next[x]: checked on the joint of (first, second).
    first_of_accepted = output_ids[accepted_first, 0]
    second_of_accepted = output_ids[accepted_first, 1]
    context_counts = torch.bincount(first_of_accepted, minlength=VOCAB_SIZE)
    joint = _histogram(first_of_accepted * VOCAB_SIZE + second_of_accepted, VOCAB_SIZE**2)
    expected_joint = (context_counts.double() / context_counts.sum()).unsqueeze(-1) * pair.target_next
    assert _tv(joint, expected_joint.flatten()) < _conditional_tv_bound(context_counts, pair.target_next)

    # Bonus tokens follow the target's bonus distribution given the last draft.
    last_draft = output_ids[got_bonus, 1]
    bonus = output_ids[got_bonus, 2]
    context_counts = torch.bincount(last_draft, minlength=VOCAB_SIZE)
    joint = _histogram(last_draft * VOCAB_SIZE + bonus, VOCAB_SIZE**2)
    expected_joint = (context_counts.double() / context_counts.sum()).unsqueeze(-1) * pair.target_bonus
    assert _tv(joint, expected_joint.flatten()) < _conditional_tv_bound(context_counts, pair.target_bonus)

    # End to end: rows that stopped after one token get their second token from a
    # plain (K = 0) decoding step; the resulting pair must follow the target's joint.
    plain_step_ids, _ = rejection_sample(
        draft_token_ids=torch.zeros(NUM_ROWS, 0, dtype=torch.long),
        num_draft_tokens=torch.zeros(NUM_ROWS, dtype=torch.long),
        draft_probs=None,
        target_probs=pair.target_next[output_ids[:, 0]].unsqueeze(1),
        target_argmax=torch.zeros(NUM_ROWS, 1, dtype=torch.long),
        is_greedy=torch.zeros(NUM_ROWS, dtype=torch.bool),
        uniform_samples=torch.zeros(NUM_ROWS, 0),
        exponential_noise=_noise(generator, NUM_ROWS, VOCAB_SIZE),
    )
    second = torch.where(accepted_first, output_ids[:, 1], plain_step_ids[:, 0])
    joint = _histogram(output_ids[:, 0] * VOCAB_SIZE + second, VOCAB_SIZE**2)
    target_joint = (pair.target_first.unsqueeze(-1) * pair.target_next).flatten()
    assert _tv(joint, target_joint) < _tv_bound(target_joint, NUM_ROWS)


def test_lossless_with_ragged_draft_lengths():
    # Rows with 0, 1 or 2 drafts in one batch: the first token is target-distributed
    # in each group (rows with 0 drafts emit a bonus token straight away).
    pair = ToyPair(5)
    generator = torch.Generator().manual_seed(55)
    num_draft_tokens = torch.randint(0, NUM_DRAFT_SLOTS + 1, (NUM_ROWS,), generator=generator)
    inputs = pair.verify_inputs(generator, num_draft_tokens)
    output_ids, num_emitted = rejection_sample(**inputs)
    assert bool((num_emitted <= num_draft_tokens + 1).all())
    for group_size in range(NUM_DRAFT_SLOTS + 1):
        in_group = num_draft_tokens == group_size
        first_hist = _histogram(output_ids[in_group, 0], VOCAB_SIZE)
        assert _tv(first_hist, pair.target_first) < _tv_bound(pair.target_first, int(in_group.sum()))


def test_lossless_after_top_k_top_p():
    generator = torch.Generator().manual_seed(9)
    num_positions = NUM_DRAFT_SLOTS + 1
    target_logits = 2.0 * torch.randn(num_positions, VOCAB_SIZE, generator=generator)
    # The draft approximates the target's logits, so its filtered support overlaps
    # the target's without matching it.
    logit_error = 1.5 * torch.randn(NUM_DRAFT_SLOTS, VOCAB_SIZE, generator=generator)
    draft_logits = target_logits[:NUM_DRAFT_SLOTS] + logit_error

    def process(logits: torch.Tensor) -> torch.Tensor:
        rows = logits.shape[0]
        return logits_to_probs(
            logits,
            temperature=torch.full((rows,), 0.8),
            top_k=torch.full((rows,), 5, dtype=torch.long),
            top_p=torch.full((rows,), 0.9),
        )

    target_probs = process(target_logits)  # [K+1, V], with zeros
    draft_probs = process(draft_logits)  # [K, V]
    # The draft must propose tokens the target forbids, or the test is too easy.
    assert bool(((draft_probs > 0) & (target_probs[:NUM_DRAFT_SLOTS] == 0)).any())

    draft_token_ids = torch.stack(
        [
            sample_from_probs(
                draft_probs[j].expand(NUM_ROWS, VOCAB_SIZE), _noise(generator, NUM_ROWS, VOCAB_SIZE)
            )
            for j in range(NUM_DRAFT_SLOTS)
        ],
        dim=1,
    )
    output_ids, num_emitted = rejection_sample(
        draft_token_ids=draft_token_ids,
        num_draft_tokens=torch.full((NUM_ROWS,), NUM_DRAFT_SLOTS),
        draft_probs=draft_probs.expand(NUM_ROWS, -1, -1),
        target_probs=target_probs.expand(NUM_ROWS, -1, -1),
        target_argmax=target_logits.argmax(-1).expand(NUM_ROWS, -1),
        is_greedy=torch.zeros(NUM_ROWS, dtype=torch.bool),
        uniform_samples=torch.rand(NUM_ROWS, NUM_DRAFT_SLOTS, generator=generator),
        exponential_noise=_noise(generator, NUM_ROWS, VOCAB_SIZE),
    )
    # Position j is emitted whenever num_emitted > j; the target here is context free,
    # so each emitted position follows the processed target at that position.
    for position in range(num_positions):
        emitted_here = output_ids[num_emitted > position, position]
        assert emitted_here.numel() > 1000
        assert bool((target_probs[position, emitted_here] > 0).all()), "emitted a filtered-out token"
        hist = _histogram(emitted_here, VOCAB_SIZE)
        assert _tv(hist, target_probs[position]) < _tv_bound(target_probs[position], emitted_here.numel())


def test_identical_draft_accepts_everything():
    pair = ToyPair(3)
    generator = torch.Generator().manual_seed(33)
    inputs = pair.verify_inputs(generator, torch.full((NUM_ROWS,), NUM_DRAFT_SLOTS))
    inputs["draft_probs"] = inputs["target_probs"][:, :NUM_DRAFT_SLOTS].clone()
    output_ids, num_emitted = rejection_sample(**inputs)
    assert bool((num_emitted == NUM_DRAFT_SLOTS + 1).all())
    assert torch.equal(output_ids[:, :NUM_DRAFT_SLOTS], inputs["draft_token_ids"])


def test_seeded_determinism():
    pair = ToyPair(4)
    inputs_a = pair.verify_inputs(torch.Generator().manual_seed(44), torch.full((NUM_ROWS,), NUM_DRAFT_SLOTS))
    inputs_b = pair.verify_inputs(torch.Generator().manual_seed(44), torch.full((NUM_ROWS,), NUM_DRAFT_SLOTS))
    first = rejection_sample(**inputs_a)
    second = rejection_sample(**inputs_b)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])

    # Fresh randomness (same drafts and probs) must change some outcomes.
    fresh = torch.Generator().manual_seed(45)
    inputs_b["uniform_samples"] = torch.rand(NUM_ROWS, NUM_DRAFT_SLOTS, generator=fresh)
    inputs_b["exponential_noise"] = _noise(fresh, NUM_ROWS, VOCAB_SIZE)
    third = rejection_sample(**inputs_b)
    assert not torch.equal(first[0], third[0])


def test_sample_from_probs_follows_probs():
    generator = torch.Generator().manual_seed(12)
    probs = _peaked_probs(generator, VOCAB_SIZE)
    # Unnormalized weights are fine: the exponential race is scale invariant.
    weights = 3.0 * probs.expand(NUM_ROWS, VOCAB_SIZE)
    samples = sample_from_probs(weights, _noise(generator, NUM_ROWS, VOCAB_SIZE))
    assert samples.dtype == torch.long
    assert _tv(_histogram(samples, VOCAB_SIZE), probs) < _tv_bound(probs, NUM_ROWS)


# ---------------------------------------------------------------- logits_to_probs


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
def test_logits_to_probs_matches_reference(seed, logits_dtype):
    generator = torch.Generator().manual_seed(seed)
    num_rows, vocab_size = 12, 37
    logits = (3.0 * torch.randn(num_rows, vocab_size, generator=generator)).to(logits_dtype)
    temperature = torch.tensor([0.0, 0.5, 1.0, 1.7] * 3)
    top_k = torch.tensor([0, 1, 3, vocab_size, 50, 10] * 2)
    top_p = torch.tensor([1.0, 0.5, 0.9, 0.0, 1.0, 0.3, 0.99, 1.0, 0.7, 1.0, 0.05, 0.8])
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    assert probs.dtype == torch.float32 and probs.shape == (num_rows, vocab_size)
    expected = logits_to_probs_reference(logits, temperature, top_k, top_p)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(probs > 0, expected > 0)  # same kept sets, exactly
    torch.testing.assert_close(probs.sum(-1), torch.ones(num_rows))


def test_logits_to_probs_fast_path_is_plain_softmax():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 11, generator=generator)
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])
    top_k_off, top_p_off = torch.zeros(4, dtype=torch.long), torch.ones(4)
    probs = logits_to_probs(logits, temperature, top_k_off, top_p_off)
    # Temperature 0 (greedy) is treated as 1.0 for the returned distribution.
    expected = torch.softmax(logits / torch.tensor([1.0, 0.5, 1.0, 2.0]).unsqueeze(-1), dim=-1)
    torch.testing.assert_close(probs, expected)
    reference = logits_to_probs_reference(logits, temperature, top_k_off, top_p_off)
    torch.testing.assert_close(probs, reference)


def test_top_k_one_and_tiny_top_p_are_one_hot_on_argmax():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 20, generator=generator)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 20).float()
    top_k_one = logits_to_probs(logits, torch.ones(6), torch.ones(6, dtype=torch.long), torch.ones(6))
    assert torch.equal(top_k_one, one_hot)
    tiny_top_p = logits_to_probs(
        logits, torch.full((6,), 0.7), torch.zeros(6, dtype=torch.long), torch.full((6,), 1e-6)
    )
    assert torch.equal(tiny_top_p, one_hot)


def test_top_k_then_top_p_order():
    # Probs 0.4, 0.3, 0.2, 0.1. top_k=2 renormalizes to 4/7, 3/7; top_p=0.5 then keeps
    # only the first (4/7 >= 0.5). Applying top-p first would have kept two tokens.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    probs = logits_to_probs(logits, torch.ones(1), torch.tensor([2]), torch.tensor([0.5]))
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    probs = logits_to_probs(logits, torch.ones(1), torch.tensor([3]), torch.tensor([0.75]))
    torch.testing.assert_close(probs, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))
