"""SpecController with real Ray actors: bounds reach every router; a router outlives it.

No Serve app: routers here are the router-side code (ControllerClient, RouterTelemetry)
over fake signals or an in-process step loop, so the test takes seconds, not minutes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

import pytest

from helpers import tiny_model
from test_cluster_policy import router
from helpers import perturbed, make_engine, random_prompts
from specserve_ray.async_engine import AsyncSpecEngine
from specserve_ray.config import SignalsConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.contracts import RuntimeBounds
from specserve_ray.workers.host import run_draft, run_target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()


def _name() -> str:
    return f"SpecController:test-{uuid.uuid4().hex[:8]}"


def test_bounds_reach_every_router(ray_cluster):
    from deployments.controller import NAMESPACE, ControllerClient

    name = _name()
    # A long interval: after the first report the controller re-decides only when the
    # test calls update(), so the sequence below is deterministic.
    a = ControllerClient(name, report_interval_s=30.0, timeout_s=5.0)
    b = ControllerClient(name, report_interval_s=30.0, timeout_s=5.0)

    async def main():
        seen_a = [await a.report(router("a", running=2))]
        actor = ray_cluster.get_actor(name, namespace=NAMESPACE)
        seen_b = []
        for _ in range(3):
            # Both routers full, b with a queue: the cluster is under pressure and both
            # routers get the same, halving cap with their next report.
            seen_b.append(await b.report(router("b", running=16, capacity=16, queue=6)))
            seen_a.append(await a.report(router("a", running=16, capacity=16)))
            await actor.update.remote()
        seen_b.append(await b.report(router("b", running=16, capacity=16, queue=6)))
        return seen_a, seen_b, actor

    seen_a, seen_b, actor = asyncio.run(main())
    assert seen_a[0] == RuntimeBounds(True, None, None)
    assert [x.max_k for x in seen_a] == [None, None, 4, 2]
    assert [x.max_k for x in seen_b] == [None, 4, 2, 1]
    assert seen_a[1:] == seen_b[:3]                      # one set of bounds for everyone
    snap = ray_cluster.get(actor.snapshot.remote())
    assert snap["routers"] == ["a", "b"] and snap["queue_depth"] == 6 and snap["level"] == 1
    ray_cluster.kill(actor)


def test_unavailable_controller_is_logged_once_and_retried(ray_cluster, caplog):
    from deployments.controller import ControllerClient

    client = ControllerClient(_name(), create=False, timeout_s=1.0, retry_s=0.2)

    async def main():
        out = [await client.report(router()) for _ in range(3)]
        await asyncio.sleep(0.3)
        out.append(await client.report(router()))
        return out

    with caplog.at_level(logging.WARNING, logger="specserve_ray"):
        assert asyncio.run(main()) == [None] * 4
    assert client.failing and client.failures == 2       # the retry wait skips attempts
    assert sum("unavailable" in r.message for r in caplog.records) == 1


def test_router_keeps_serving_with_its_last_bounds_when_the_controller_dies(ray_cluster):
    from deployments.controller import NAMESPACE, ControllerClient
    from deployments.telemetry import RouterTelemetry

    name = _name()
    target = tiny_model("llama", seed=0)
    engine = make_engine(target, perturbed(target, 0.15), k=4, max_seqs=4)
    cfg = SignalsConfig(report_interval_s=0.1, controller=True, controller_timeout_s=2.0,
                        controller_retry_s=30.0)
    busy = ControllerClient(name, report_interval_s=0.1, timeout_s=5.0)
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    async def execute(plan):
        return run_target(engine.target, run_draft(engine.draft, plan))

    async def wait_for(predicate, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    async def keep_reporting_overload():
        while True:
            await busy.report(router("busy", running=64, capacity=64, queue=9))
            await asyncio.sleep(0.1)

    async def main():
        serving = AsyncSpecEngine(engine, execute)
        telemetry = RouterTelemetry(serving, cfg, "real-router", name)
        telemetry.start()
        overload = asyncio.get_running_loop().create_task(keep_reporting_overload())
        try:
            # Another router reports overload (64 of the 68 slots busy, 9 queued): the cap
            # halves down to "off", and it reaches this router too.
            await wait_for(lambda: not engine.chooser.bounds.speculation_enabled)
            drafted = engine.totals.num_draft_tokens
            first = await asyncio.gather(*(serving.generate(p, params) for p in random_prompts(2, seed=1)))
            assert engine.totals.num_draft_tokens == drafted          # no drafting under "off"
            last = engine.chooser.bounds

            overload.cancel()
            ray_cluster.kill(ray_cluster.get_actor(name, namespace=NAMESPACE))
            await wait_for(lambda: telemetry.client.failing)
            # Still serving, still under the last bounds, while the controller is gone.
            later = await asyncio.gather(*(serving.generate(p, params) for p in random_prompts(3, seed=2)))
            assert engine.chooser.bounds == last and engine.totals.num_draft_tokens == drafted
            snap = telemetry.snapshot()
            assert snap["controller"]["available"] is False
            assert snap["bounds"]["speculation_enabled"] is False
            assert snap["totals"]["finished"] == 5
            return first + later
        finally:
            overload.cancel()
            await telemetry.stop()
            await serving.stop()

    results = asyncio.run(main())
    assert [r["completion_tokens"] for r in results] == [8] * 5
