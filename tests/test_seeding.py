"""Per-request seeds: any int a client sends seeds both workers' generators, reproducibly."""
from __future__ import annotations

import pytest
import torch

from specserve_ray.contracts import SeqSampling
from specserve_ray.core.sampling import stream_seed
from specserve_ray.workers.draft import _DRAFT_STREAM, _DraftSeq
from specserve_ray.workers.target import _TARGET_STREAM, _TargetSeq

EXTREME_SEEDS = [0, 1, 2**31, 10**13, 10**15, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**70,
                 -1, -(10**13), -(2**63), -(2**64)]


@pytest.mark.parametrize("seed", EXTREME_SEEDS)
def test_stream_seed_fits_the_generator(seed):
    for stream in (_DRAFT_STREAM, _TARGET_STREAM):
        value = stream_seed(seed, stream)
        assert 0 <= value < 2**63
        assert value == stream_seed(seed, stream)                 # deterministic
        torch.Generator().manual_seed(value)                      # accepted


def test_small_seeds_keep_their_historical_streams():
    assert stream_seed(7, _TARGET_STREAM) == 7 * 1_000_003 + _TARGET_STREAM


@pytest.mark.parametrize("cls", [_DraftSeq, _TargetSeq])
def test_workers_seed_any_int_and_different_seeds_differ(cls):
    def draws(seed):
        seq = cls([1, 2], SeqSampling(temperature=1.0, top_k=0, top_p=1.0, seed=seed))
        return torch.rand(8, generator=seq.generator).tolist()

    samples = {seed: draws(seed) for seed in EXTREME_SEEDS}
    for seed in EXTREME_SEEDS:
        assert draws(seed) == samples[seed]                       # reproducible
    distinct = {tuple(v) for v in samples.values()}
    assert len(distinct) == len(EXTREME_SEEDS)                    # no two seeds collide


def test_draft_and_target_streams_differ():
    assert stream_seed(2**64 - 1, _DRAFT_STREAM) != stream_seed(2**64 - 1, _TARGET_STREAM)
    assert stream_seed(5, _DRAFT_STREAM) != stream_seed(5, _TARGET_STREAM)
