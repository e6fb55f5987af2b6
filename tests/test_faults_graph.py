"""Worker faults with the compiled-graph transport and pipelining on, and real kill -9.

While the draft is down the graph is torn down and steps go to the target by plain
actor calls; a fresh graph is compiled once the new draft is resynced. The kill tests
send SIGKILL to the real worker processes (their PIDs from the workers themselves)
under load.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from fault_app import (PROMPTS, faults, reference_fn, run_batch, slots_back_to_zero,
                       start_app, stop_app, wait_for)

pytestmark = pytest.mark.slow

LENGTHS = [40, 32, 48, 36, 44, 30, 38, 42]


@pytest.fixture(scope="module")
def app():
    handle, url = start_app("compiled_graph", pipeline=True)
    yield handle, url
    stop_app()


@pytest.fixture(scope="module")
def reference():
    return reference_fn()


def _expect(reference, n):
    return [reference(p, m) for p, m in zip(PROMPTS[:n], LENGTHS[:n])]


def _identical(results, expected):
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, f"{len(failed)} requests failed: {failed[:2]}"
    assert [r["token_ids"] for r in results] == expected


@pytest.mark.parametrize("role,action", [("draft", "die"), ("draft", "raise"), ("target", "die")])
def test_worker_fault_with_graph_and_pipelining(app, reference, role, action):
    handle, _ = app
    before = faults(handle)
    handle.inject_fault.remote(role, action, at_step=5).result()
    _identical(run_batch(handle, PROMPTS[:6], LENGTHS[:6], f"graph-{role}-{action}"),
               _expect(reference, 6))
    key = "draft_restarts" if role == "draft" else "target_restarts"
    assert wait_for(lambda: faults(handle)[key] > before[key] and faults(handle)["draft_up"], 60)
    stats = handle.stats.remote().result()
    assert stats["overlapped_steps"] > 0
    drafted = stats["speculation"]["num_draft_tokens"]
    # Back on a fresh compiled graph, speculating.
    _identical(run_batch(handle, PROMPTS[:2], LENGTHS[:2], f"graph-{role}-{action}-after"),
               _expect(reference, 2))
    assert handle.stats.remote().result()["speculation"]["num_draft_tokens"] > drafted
    assert slots_back_to_zero(handle) == (0, 0)


def _kill_during(handle, role: str, n: int, prefix: str, delay_s: float = 1.0):
    """Start n greedy requests, SIGKILL the worker's process while they run."""
    pid = handle.worker_pids.remote().result()[role]
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(
        run_batch(handle, PROMPTS[:n], LENGTHS[:n], prefix)))
    runner.start()
    time.sleep(delay_s)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    runner.join()
    return results, killed_at


def test_kill_9_draft_under_load(app, reference):
    handle, _ = app
    before = faults(handle)
    results, killed_at = _kill_during(handle, "draft", 8, "kill-draft")
    _identical(results, _expect(reference, 8))
    assert wait_for(lambda: faults(handle)["draft_restarts"] > before["draft_restarts"], 60)
    assert faults(handle)["draft_fallback_steps"] > before["draft_fallback_steps"]
    assert slots_back_to_zero(handle) == (0, 0)


def test_kill_9_target_under_load(app, reference):
    handle, _ = app
    before = faults(handle)
    results, _ = _kill_during(handle, "target", 8, "kill-target")
    _identical(results, _expect(reference, 8))
    assert faults(handle)["target_restarts"] == before["target_restarts"] + 1
    assert slots_back_to_zero(handle) == (0, 0)
