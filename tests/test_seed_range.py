"""Every seed a client may send decodes, end to end in process, and is reproducible.

Issue 13: a seed above ~1e13 used to overflow the workers' generator seeding inside the
step and fail every request of the batch. SamplingParams accepts [-2**63, 2**64) and
reduces it to the generator's range (config.generator_seed); the workers mix in their
stream number without overflowing.
"""
from __future__ import annotations

import pytest

from helpers import tiny_model
from specserve_ray.sampling_params import SamplingParams
from helpers import make_engine, perturbed, random_prompts

HUGE = [99999999999999, 2**63 - 1, 2**63, 2**64 - 1, -2**63, -1]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=21, scale=1.3)
    return target, perturbed(target, noise=0.3)


PROMPTS = random_prompts(len(HUGE) + 1, seed=21)


def _run(pair, seeds: list[int], prompts=PROMPTS) -> list[list[int]]:
    engine = make_engine(*pair, k=3)
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)
              for s in seeds]
    return [o.output_ids for o in engine.generate(prompts[:len(seeds)], params)]


def test_huge_seeds_decode_beside_an_ordinary_one_and_reproduce(pair):
    seeds = HUGE + [7]
    first = _run(pair, seeds)
    assert all(len(ids) == 12 for ids in first)
    assert _run(pair, seeds) == first
    # The neighbour with an ordinary seed decodes as it does alone.
    assert _run(pair, [7], PROMPTS[-1:])[0] == first[-1]


def test_reduction_is_the_documented_one(pair):
    """-1 and 2**64 - 1 are one 64-bit pattern, hence one generator; 0 is another."""
    (minus_one,) = _run(pair, [-1])
    (top,) = _run(pair, [2**64 - 1])
    (zero,) = _run(pair, [0])
    assert minus_one == top != zero
