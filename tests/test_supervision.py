"""The supervised step loop, in process: real workers on tiny models, failures injected
around them. Only a request that fails on its own is failed; a crashed loop restarts;
slots come back on both workers; draining refuses new work and finishes the rest.
"""
from __future__ import annotations

import asyncio

import pytest

from helpers import hf_greedy, tiny_model
from helpers import make_engine, perturbed, random_prompts
from specserve_ray.async_engine import AsyncSpecEngine, StepFailed
from specserve_ray.config import FaultsConfig, parse_fault_env
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.errors import RequestError, UnavailableError
from specserve_ray.faults import FaultInjector, InjectedFault
from specserve_ray.workers.host import run_draft, run_target

LENGTHS = [17, 9, 30, 4, 22, 13]


def _setup():
    target = tiny_model("llama", seed=3)
    engine = make_engine(target, perturbed(target, noise=0.2), k=3, max_seqs=8)
    engine.release_eagerly = False
    return target, engine


def _slots(engine) -> tuple[int, int]:
    return engine.target.runner.num_seqs(), engine.draft.runner.num_seqs()


async def _settle(serving, engine):
    """Let the release-only plan after the last request run, then stop."""
    for _ in range(50):
        if _slots(engine) == (0, 0):
            break
        await asyncio.sleep(0.02)
    await serving.stop()


def test_step_error_fails_only_the_culprit():
    target, engine = _setup()
    prompts = random_prompts(5, seed=21)
    calls = {"n": 0}

    async def execute(plan):
        calls["n"] += 1
        if calls["n"] == 4:                   # one transient failure of a whole batch
            raise RuntimeError("transient worker error")
        ids = [*plan.decode_ids, *(p.seq_id for p in plan.prefill)]
        if any(i.startswith("bad") for i in ids):
            raise RuntimeError("this request breaks its step")
        return run_target(engine.target, run_draft(engine.draft, plan))

    async def main():
        serving = AsyncSpecEngine(engine, execute)
        good = [asyncio.create_task(serving.generate(
            p, SamplingParams(max_tokens=n, ignore_eos=True), request_id=f"ok-{i}"))
            for i, (p, n) in enumerate(zip(prompts[:4], LENGTHS))]
        bad = asyncio.create_task(serving.generate(
            prompts[4], SamplingParams(max_tokens=10, ignore_eos=True), request_id="bad-1"))
        results = await asyncio.gather(*good)
        with pytest.raises(StepFailed, match="request failed in its step"):
            await bad
        stats = serving.stats()
        await _settle(serving, engine)
        return results, stats

    results, stats = asyncio.run(main())
    for p, n, r in zip(prompts, LENGTHS, results):
        assert r["token_ids"] == hf_greedy(target, p, n)
    assert stats["faults"]["failed_requests"] == 1
    assert stats["faults"]["step_errors"] >= 2
    assert _slots(engine) == (0, 0)


def test_crashed_loop_restarts():
    target, engine = _setup()
    prompts = random_prompts(4, seed=5)
    apply = engine.apply_step
    calls = {"n": 0}

    def flaky_apply(plan, result, seconds):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("bug in the loop")     # escapes _finish: the loop dies
        return apply(plan, result, seconds)

    engine.apply_step = flaky_apply

    async def execute(plan):
        return run_target(engine.target, run_draft(engine.draft, plan))

    async def main():
        serving = AsyncSpecEngine(engine, execute)
        results = await asyncio.wait_for(asyncio.gather(*(
            serving.generate(p, SamplingParams(max_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, LENGTHS))), 120)
        stats = serving.stats()
        serving.liveness()                        # healthy again
        await _settle(serving, engine)
        return results, stats

    results, stats = asyncio.run(main())
    for p, n, r in zip(prompts, LENGTHS, results):
        assert r["token_ids"] == hf_greedy(target, p, n)
    assert stats["faults"]["loop_restarts"] == 1
    assert _slots(engine) == (0, 0)


def test_drain_finishes_running_and_refuses_new():
    target, engine = _setup()
    prompts = random_prompts(3, seed=9)

    async def execute(plan):
        await asyncio.sleep(0.005)
        return run_target(engine.target, run_draft(engine.draft, plan))

    async def main():
        serving = AsyncSpecEngine(engine, execute)
        running = [asyncio.create_task(serving.generate(
            p, SamplingParams(max_tokens=n, ignore_eos=True))) for p, n in zip(prompts, LENGTHS)]
        await asyncio.sleep(0.05)
        drain = asyncio.create_task(serving.drain(60))
        await asyncio.sleep(0)
        with pytest.raises(UnavailableError, match="shutting down"):
            await serving.generate(prompts[0], SamplingParams(max_tokens=3))
        assert serving.readiness()[0] is False
        left = await drain
        return await asyncio.gather(*running), left, serving.stats()

    results, left, stats = asyncio.run(main())
    assert left == 0
    for p, n, r in zip(prompts, LENGTHS, results):
        assert r["token_ids"] == hf_greedy(target, p, n)
    assert stats["faults"]["refused_draining"] == 1


def test_bad_request_id_and_timeout_are_refused_cleanly():
    _, engine = _setup()

    async def execute(plan):
        return run_target(engine.target, run_draft(engine.draft, plan))

    async def main():
        serving = AsyncSpecEngine(engine, execute)
        with pytest.raises(RequestError, match="request_id must be a string"):
            await serving.generate([5, 6, 7], request_id=["not", "hashable"])
        with pytest.raises(RequestError, match="timeout_s"):
            await serving.generate([5, 6, 7], timeout_s=0)
        out = await serving.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
        await serving.stop()
        return out

    assert len(asyncio.run(main())["token_ids"]) == 3


def test_fault_config_and_injector():
    assert parse_fault_env("draft:die@20, target:stall@5:3,target:raise@req=bad") == [
        {"role": "draft", "action": "die", "at_step": 20},
        {"role": "target", "action": "stall", "at_step": 5, "stall_s": 3.0},
        {"role": "target", "action": "raise", "request": "bad"}]
    with pytest.raises(ValueError, match="role:action"):
        parse_fault_env("draft-die")
    with pytest.raises(ValueError, match="allow_fault_injection"):
        FaultsConfig(inject=[{"role": "draft", "action": "raise", "at_step": 1}])
    with pytest.raises(ValueError, match="exactly one trigger"):
        FaultsConfig(allow_fault_injection=True, inject=[{"role": "draft", "action": "raise"}])
    inj = FaultInjector([{"action": "raise", "at_step": 2}])
    inj.on_step("draft", ["a"])
    with pytest.raises(InjectedFault):
        inj.on_step("draft", ["a"])
    inj.on_step("draft", ["a"])             # once only
    inj.arm([{"action": "raise", "at_step": 1}])
    with pytest.raises(InjectedFault):
        inj.on_step("draft", ["a"])
    from specserve_ray.contracts import PrefillItem, SeqSampling

    inj.arm([{"action": "raise", "token": 77}])
    inj.on_step("draft", ["b"], [PrefillItem("b", [1, 2], SeqSampling())])
    with pytest.raises(InjectedFault):     # its prompt held the token: every step fires
        inj.on_step("draft", ["c"], [PrefillItem("c", [5, 77], SeqSampling())])
    with pytest.raises(InjectedFault):
        inj.on_step("draft", ["b", "c"])


def test_shipped_configs_cannot_inject(monkeypatch):
    from specserve_ray.config import AppConfig

    monkeypatch.setenv("SPECSERVE_FAULTS", "draft:die@3")
    with pytest.raises(ValueError, match="refused"):
        AppConfig.model_validate({})


def test_stalled_stream_is_aborted_and_frees_slots():
    """A consumer that stops taking output (a client that stopped reading) is aborted
    once a chunk has waited `stalled_client_s`; its neighbour streams on untouched."""
    target, engine = _setup()
    prompts = random_prompts(2, seed=31)
    engine.limits = engine.limits.model_copy(update={"max_tokens": 200})

    async def execute(plan):
        await asyncio.sleep(0.01)       # steps take real time, like remote workers
        return run_target(engine.target, run_draft(engine.draft, plan))

    async def main():
        serving = AsyncSpecEngine(engine, execute)
        serving.fault_cfg = serving.fault_cfg.model_copy(update={"stalled_client_s": 0.3})
        params = SamplingParams(max_tokens=150, ignore_eos=True)
        stalled = serving.generate_stream(prompts[0], params, request_id="stalled")
        await stalled.__anext__()                   # reads once, then stops reading
        good = await serving.generate(prompts[1], params, request_id="good")
        with pytest.raises(RequestError, match="took no output"):
            async for _ in stalled:
                pass
        await _settle(serving, engine)
        return good, serving.faults.counts["stalled_clients"]

    good, stalled_count = asyncio.run(main())
    assert good["token_ids"] == hf_greedy(target, prompts[1], 150)
    assert stalled_count == 1
    assert _slots(engine) == (0, 0)
