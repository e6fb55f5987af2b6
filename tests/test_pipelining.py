"""Draft/verify pipelining in the router's step loop: two micro-batches in flight.

The workers run on two single-thread executors standing in for the draft and target
actors (each runs its calls one at a time, in submission order, as a Ray actor does), so
the draft worker can draft one micro-batch while the target verifies the other. Output
must stay exactly the target's.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import hf_greedy, tiny_model
from helpers import make_engine, perturbed, random_prompts
from specserve_ray.async_engine import AsyncSpecEngine
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.workers.host import run_draft, run_target


class TwoWorkers:
    """execute(plan) over a draft 'actor' and a target 'actor'; records the overlap."""

    def __init__(self, engine):
        self.draft, self.target = engine.draft, engine.target
        self.draft_pool, self.target_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        self.in_flight = self.max_in_flight = 0

    async def execute(self, plan):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            drafted = self.draft_pool.submit(run_draft, self.draft, plan)
            # Submitted at once, like target.step.remote(draft_ref): per-worker FIFO order.
            verified = self.target_pool.submit(lambda: run_target(self.target, drafted.result()))
            return await asyncio.wrap_future(verified)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("pipeline", [False, True])
def test_pipelined_loop_is_lossless(pipeline):
    target = tiny_model("llama", seed=3)
    draft = perturbed(target, noise=0.2)
    engine = make_engine(target, draft, k=3, max_seqs=8)
    workers = TwoWorkers(engine)
    prompts = random_prompts(6, seed=21)
    lengths = [17, 9, 30, 4, 22, 13]

    async def main():
        serving = AsyncSpecEngine(engine, workers.execute, pipeline=pipeline)
        first = [asyncio.create_task(serving.generate(p, SamplingParams(max_tokens=n, ignore_eos=True)))
                 for p, n in zip(prompts[:4], lengths[:4])]
        await asyncio.sleep(0.05)              # later arrivals join a running pipeline
        later = [asyncio.create_task(serving.generate(p, SamplingParams(max_tokens=n, ignore_eos=True)))
                 for p, n in zip(prompts[4:], lengths[4:])]
        # A pause drains the pipeline and holds it; generation resumes afterwards.
        async with serving.paused():
            assert not serving._in_flight
        results = await asyncio.gather(*first, *later)
        stats = serving.stats()
        await serving.stop()
        return results, stats

    results, stats = asyncio.run(main())
    for p, n, r in zip(prompts, lengths, results):
        assert r["token_ids"] == hf_greedy(target, p, n)
    if pipeline:
        assert workers.max_in_flight == 2 and stats["overlapped_steps"] > 0
    else:
        assert workers.max_in_flight == 1 and stats["overlapped_steps"] == 0


def test_seeded_sampling_is_unchanged_by_pipelining():
    """Per-request random streams make a seeded request's output independent of which
    micro-batch it rides in, so pipelining must not change it at all."""
    target = tiny_model("qwen2", seed=4, scale=1.3)
    draft = perturbed(target, noise=0.3)
    prompts = random_prompts(5, seed=8)
    params = [SamplingParams(max_tokens=n, temperature=1.0, top_p=0.9, seed=100 + i,
                             ignore_eos=True) for i, n in enumerate([12, 25, 7, 19, 16])]

    def run(pipeline):
        engine = make_engine(target, draft, k=3, max_seqs=8)
        workers = TwoWorkers(engine)

        async def main():
            serving = AsyncSpecEngine(engine, workers.execute, pipeline=pipeline)
            out = await asyncio.gather(*(serving.generate(p, sp) for p, sp in zip(prompts, params)))
            await serving.stop()
            return [r["token_ids"] for r in out]

        return asyncio.run(main()), workers.max_in_flight

    plain, depth_plain = run(False)
    piped, depth_piped = run(True)
    assert (depth_plain, depth_piped) == (1, 2)
    assert piped == plain
