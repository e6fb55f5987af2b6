"""Worker faults on a real local Serve app (actor transport): nothing is lost.

Faults are injected into the real worker actors (specserve_ray/faults.py): a draft that
raises, dies (os._exit) or stalls past the step deadline degrades to target-only steps
and comes back; a target that dies is recreated and its requests resume; a step that
raises is retried request by request so only a request failing alone fails. Every
case checks the outputs against target-only greedy decoding and the slots afterwards.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from fault_app import (PROMPTS, faults, reference_fn, run_batch, slots_back_to_zero,
                       start_app, stop_app, wait_for)

pytestmark = pytest.mark.slow

LENGTHS = [40, 32, 48, 36, 44, 30]


@pytest.fixture(scope="module")
def app():
    handle, url = start_app("actor")
    yield handle, url
    stop_app()


@pytest.fixture(scope="module")
def reference():
    return reference_fn()


def _expect(reference, n: int = 6):
    return [reference(p, m) for p, m in zip(PROMPTS[:n], LENGTHS[:n])]


def _check_all_identical(results, expected):
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, f"{len(failed)} requests failed: {failed[:2]}"
    assert [r["token_ids"] for r in results] == expected


def _speculation_resumed(handle, before: dict):
    """The draft is back and has drafted tokens again since `before`."""
    f = faults(handle)
    return f["draft_up"] and f["draft_restarts"] > before["draft_restarts"]


def test_injection_refused_by_default():
    from specserve_ray.config import AppConfig

    with pytest.raises(ValueError, match="allow_fault_injection"):
        AppConfig.model_validate({"faults": {"inject": [{"role": "draft", "action": "die",
                                                         "at_step": 3}]}})


@pytest.mark.parametrize("action", ["raise", "die", "stall"])
def test_draft_fault_degrades_and_recovers(app, reference, action):
    handle, _ = app
    before = faults(handle)
    handle.inject_fault.remote("draft", action, at_step=4, stall_s=20.0).result()
    results = run_batch(handle, PROMPTS[:6], LENGTHS, f"draft-{action}")
    _check_all_identical(results, _expect(reference))
    after = faults(handle)
    assert after["draft_failures"] > before["draft_failures"]
    assert after["draft_fallback_steps"] > before["draft_fallback_steps"]
    assert after["failed_requests"] == before["failed_requests"]
    # Speculation resumes: a fresh draft, resynced, drafting again.
    assert wait_for(lambda: _speculation_resumed(handle, before), 60)
    drafted = handle.stats.remote().result()["speculation"]["num_draft_tokens"]
    _check_all_identical(run_batch(handle, PROMPTS[:2], LENGTHS[:2], f"after-{action}"),
                         _expect(reference, 2))
    assert handle.stats.remote().result()["speculation"]["num_draft_tokens"] > drafted
    assert slots_back_to_zero(handle) == (0, 0)


def test_target_dies_requests_resume(app, reference):
    handle, url = app
    before = faults(handle)
    seen = []
    stop = threading.Event()

    def poll_health():
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                try:
                    seen.append(client.get(url + "/health").status_code)
                except httpx.HTTPError:
                    seen.append(-1)
                time.sleep(0.1)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    handle.inject_fault.remote("target", "die", at_step=6).result()
    try:
        results = run_batch(handle, PROMPTS[:6], LENGTHS, "target-die")
    finally:
        stop.set()
        poller.join()
    _check_all_identical(results, _expect(reference))
    after = faults(handle)
    assert after["target_restarts"] == before["target_restarts"] + 1
    assert after["resumed_requests"] > before["resumed_requests"]
    assert after["target_up"] and after["healthy"]
    assert 503 in seen and seen[-1] == 200        # readiness: down while recovering
    handle.check_health.remote().result()         # liveness stayed/turned green
    assert slots_back_to_zero(handle) == (0, 0)


def test_target_raises_once_no_request_fails(app, reference):
    handle, _ = app
    before = faults(handle)
    handle.inject_fault.remote("target", "raise", at_step=5).result()
    results = run_batch(handle, PROMPTS[:6], LENGTHS, "target-raise")
    _check_all_identical(results, _expect(reference))
    after = faults(handle)
    assert after["step_errors"] == before["step_errors"] + 1
    assert after["isolation_retries"] > before["isolation_retries"]
    assert after["failed_requests"] == before["failed_requests"]
    assert slots_back_to_zero(handle) == (0, 0)


def test_only_the_culprit_fails(app, reference):
    """A request whose every step raises fails alone; its batch neighbours finish. The
    culprit is marked by a token id in its prompt (the server assigns request ids)."""
    handle, _ = app
    before = faults(handle)
    marker = 1999
    handle.inject_fault.remote("target", "raise", token=marker).result()
    refs = [handle.generate.remote(p, max_tokens=n, ignore_eos=True, request_id=f"ok-{i}")
            for i, (p, n) in enumerate(zip(PROMPTS[:4], LENGTHS[:4]))]
    bad = handle.generate.remote([5, 17, 42, marker], max_tokens=30, ignore_eos=True,
                                 request_id="culprit-1")
    with pytest.raises(Exception, match="request failed in its step"):
        bad.result(timeout_s=300)
    _check_all_identical([r.result(timeout_s=300) for r in refs], _expect(reference, 4))
    after = faults(handle)
    assert after["failed_requests"] == before["failed_requests"] + 1
    assert slots_back_to_zero(handle) == (0, 0)


def test_request_timeout_is_clean(app):
    handle, _ = app
    with pytest.raises(Exception, match="deadline"):
        handle.generate.remote(PROMPTS[0], max_tokens=250, ignore_eos=True,
                               timeout_s=0.5).result(timeout_s=120)
    with pytest.raises(Exception, match="timeout_s must be a positive"):
        handle.generate.remote(PROMPTS[0], max_tokens=4, timeout_s=-1).result(timeout_s=60)
    assert faults(handle)["request_timeouts"] >= 1
    assert slots_back_to_zero(handle) == (0, 0)


def test_soak_short(app, reference):
    """60 requests of mixed lengths, ~20% cancelled mid-stream, the draft killed once:
    every request ends (completed or cancelled; greedy ones identical), slots return to
    zero on both workers, and no request fails."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from fault_app import stream_and_cancel

    handle, _ = app
    before = faults(handle)
    rng = random.Random(7)
    jobs = []
    for i in range(60):
        prompt, n = PROMPTS[rng.randrange(len(PROMPTS))], rng.choice([8, 16, 24, 40])
        jobs.append((i, prompt, n, rng.random() < 0.2))
    handle.inject_fault.remote("draft", "die", at_step=25).result()

    def one(job):
        i, prompt, n, cancel = job
        if cancel:
            return "cancelled", stream_and_cancel(handle, prompt, 200, 3, f"soak-c-{i}")
        out = handle.generate.remote(prompt, max_tokens=n, ignore_eos=True,
                                     request_id=f"soak-{i}").result(timeout_s=600)
        return "done", out["token_ids"] == reference(prompt, n)

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, jobs))
    assert all(kind == "cancelled" or ok for kind, ok in outcomes), outcomes
    assert sum(kind == "cancelled" for kind, _ in outcomes) >= 6
    after = faults(handle)
    assert after["failed_requests"] == before["failed_requests"]
    assert after["draft_failures"] > before["draft_failures"]
    assert wait_for(lambda: faults(handle)["draft_up"], 60)
    assert slots_back_to_zero(handle) == (0, 0)
    stats = handle.stats.remote().result()
    assert stats["running"] == 0 and stats["waiting"] == 0
