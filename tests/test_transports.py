"""Both router <-> worker transports over real Ray actors, with and without pipelining.

The deployment tests use the default (actor calls); this runs the same step loop over
a Ray compiled graph too, with two executions in flight when pipelining, and checks the
output is exactly the target's greedy output (the embedded pair in fp32).
"""
from __future__ import annotations

import asyncio
import os

import pytest

from specserve_ray.config import EMBEDDED_DRAFT, EMBEDDED_TARGET, LimitsConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.engine import SpecEngine

pytestmark = pytest.mark.slow

LIMITS = LimitsConfig(max_model_len=256, max_num_seqs=4, max_tokens=64)
PROMPTS = ["def parse_header(line):\n    ", "import os\nimport sys\n\n\nclass ",
           "    for key, value in ", "return [x for x in "]
LENGTHS = [14, 6, 11, 9]


@pytest.fixture(scope="module")
def actors():
    import ray

    from deployments.workers import DraftActor, TargetActor

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    limits = LIMITS.model_dump()
    target = TargetActor.options(num_cpus=0.5).remote(
        {"path": EMBEDDED_TARGET, "num_threads": 1}, limits)
    draft = DraftActor.options(num_cpus=0.5).remote(
        {"path": EMBEDDED_DRAFT, "num_threads": 1}, limits)
    ray.get([target.ready.remote(), draft.ready.remote()])
    yield draft, target
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    engine = SpecEngine.from_config()      # the embedded pair in-process; k = 0 below
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_TARGET, local_files_only=True)
    outs = engine.generate(PROMPTS, [SamplingParams(max_tokens=n, ignore_eos=True)
                                     for n in LENGTHS], num_speculative_tokens=[0] * 4)
    return tokenizer, [o.output_ids for o in outs]


def ray_num_seqs(actors) -> tuple[int, int]:
    import ray

    return tuple(ray.get(a.forward_stats.remote())["num_seqs"] for a in actors)


@pytest.mark.parametrize("transport,pipeline", [("actor", True), ("compiled_graph", False),
                                                ("compiled_graph", True)])
def test_transport_is_lossless(actors, reference, transport, pipeline):
    from deployments.transport import ActorTransport, CompiledGraphTransport
    from specserve_ray.async_engine import AsyncSpecEngine

    draft, target = actors
    tokenizer, expected = reference
    cls = CompiledGraphTransport if transport == "compiled_graph" else ActorTransport
    import ray

    vocab = ray.get(target.describe.remote())["vocab_size"]
    engine = SpecEngine.remote(tokenizer, vocab, True, LIMITS,
                               SpeculationConfig(num_speculative_tokens=3))

    async def main():
        # Built inside the running loop, as the router builds it in its replica: an
        # asyncio compiled graph belongs to the event loop it was compiled in.
        hop = cls(draft, target)
        try:
            serving = AsyncSpecEngine(engine, hop.execute, pipeline=pipeline)
            results = await asyncio.wait_for(asyncio.gather(*(
                serving.generate(p, SamplingParams(max_tokens=n, ignore_eos=True),
                                 request_id=f"{transport}-{pipeline}-{i}")
                for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)))), timeout=300)
            stats = serving.stats()
            await serving.stop()
            # Finished requests' caches are released with the next plan: send it, so the
            # shared actors start the next case empty.
            plan = engine.plan_step()
            if plan is not None:
                await hop.execute(plan)
            return results, stats
        finally:
            hop.teardown()

    results, stats = asyncio.run(main())
    assert [r["token_ids"] for r in results] == expected
    assert ray_num_seqs(actors) == (0, 0)
    assert stats["speculation"]["num_draft_tokens"] > 0
    assert (stats["overlapped_steps"] > 0) == pipeline
