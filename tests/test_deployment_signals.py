"""The real Serve app with metrics export and the cluster controller switched on.

Own app and Ray instance (the metrics port must be chosen at ray.init), so it costs one
more app start-up; it checks what only a real replica can show: the step hook and the
background loops running in Serve's event loop, the metrics on Ray's Prometheus endpoint,
the controller actor created by the router, and serving on after the controller is killed.
"""
from __future__ import annotations

import os
import time
import urllib.request

import pytest
from helpers import free_port as _free_port  # noqa: E402

pytestmark = pytest.mark.slow

APP = "specserve-signals"




def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def app():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app
    from specserve_ray.config import EMBEDDED_DRAFT, EMBEDDED_TARGET

    metrics_port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    args = {"engine": {"target": {"path": EMBEDDED_TARGET, "num_threads": 1},
                       "draft": {"path": EMBEDDED_DRAFT, "num_threads": 1},
                       "speculation": {"num_speculative_tokens": 3},
                       "limits": {"max_model_len": 256, "max_num_seqs": 4, "max_tokens": 64}},
            "signals": {"report_interval_s": 0.5, "controller": True,
                        "controller_retry_s": 600},
            "faults": {"allow_fault_injection": True, "draft_restart_backoff_s": 0.2}}
    handle = serve.run(build_app(args), name=APP, route_prefix="/")
    yield {"handle": handle, "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "ray": ray}
    serve.shutdown()
    ray.shutdown()


def _generate_some(handle, n: int = 4) -> list[dict]:
    prompts = ["def parse(line):\n", "import os\n", "class Point:\n", "for i in range("][:n]
    responses = [handle.generate.remote(p, max_tokens=12, ignore_eos=True) for p in prompts]
    return [r.result(timeout_s=180) for r in responses]


def test_router_metrics_and_bounds_from_the_controller(app):
    handle = app["handle"]
    results = _generate_some(handle)
    drafted = sum(r["speculation"]["num_draft_tokens"] for r in results)
    accepted = sum(r["speculation"]["num_accepted_tokens"] for r in results)
    assert drafted > 0
    snap = _wait(lambda: (lambda s: s if s["totals"]["finished"] >= 4 and
                          s["controller"]["bounds_version"] is not None else None)(
        handle.metrics_snapshot.remote().result(timeout_s=30)), 60, "metrics and a controller reply")
    totals = snap["totals"]
    assert totals["num_draft_tokens"] == drafted and totals["num_accepted_tokens"] == accepted
    assert sum(totals["num_accepted_tokens_per_pos"]) == accepted
    assert totals["num_drafts"] > 0 and totals["decode_steps"] > 0
    assert snap["controller"]["available"] is True
    # One lightly loaded router: the controller leaves speculation fully on.
    assert snap["bounds"] == {"speculation_enabled": True, "max_k": None, "verify_budget": None}
    from deployments.controller import NAMESPACE

    actor = app["ray"].get_actor(f"SpecController:{APP}", namespace=NAMESPACE)
    state = app["ray"].get(actor.snapshot.remote(), timeout=30)
    assert len(state["routers"]) == 1 and state["capacity"] == 4
    stats = handle.record_autoscaling_stats.remote().result(timeout_s=30)
    assert stats["capacity"] == 4.0 and set(stats) == {"running", "queue_depth", "capacity",
                                                       "step_s", "tpot_budget_s"}


def test_metrics_reach_the_prometheus_endpoint(app):
    _generate_some(app["handle"], 2)

    names = ("ray_specserve_spec_decode_num_drafts_total", "ray_specserve_spec_decode_num_draft_tokens_total",
             'ray_specserve_spec_decode_num_accepted_tokens_per_pos_total{',
             "ray_specserve_time_to_first_token_seconds_bucket", "ray_specserve_running_requests",
             "ray_specserve_queue_depth", "ray_specserve_chosen_k_rows_total")
    seen = {"text": ""}

    def scrape():
        # Ray's exporter publishes each metric on its own schedule: a counter can be on the
        # endpoint a report interval before the histogram, so wait for every series.
        text = seen["text"] = urllib.request.urlopen(app["metrics"], timeout=10).read().decode()
        lines = [line for line in text.splitlines()
                 if line.startswith("ray_specserve_spec_decode_num_accepted_tokens_total{")
                 and f'application="{APP}"' in line]
        return (lines and float(lines[0].rsplit(" ", 1)[1]) > 0
                and all(name in text for name in names) and text)

    try:
        _wait(scrape, 90, "ray_specserve_* on the metrics endpoint")
    except AssertionError:
        missing = [name for name in names if name not in seen["text"]]
        raise AssertionError(f"series never exported within 90 s: {missing}") from None


def test_fault_and_refusal_counters_reach_the_prometheus_endpoint(app):
    """Issue item 7 end to end: a refusal, a dead draft (fallback, restart, recovery time)
    and a dead target (restart, resumed requests) counted in /v1/stats and exported."""
    handle = app["handle"]
    handle.reconfigure.remote({"max_queued_requests": 0}).result()   # every request refused
    try:
        with pytest.raises(Exception, match="overloaded"):
            handle.generate.remote("def f():\n", max_tokens=4).result(timeout_s=60)
    finally:
        handle.reconfigure.remote({"max_queued_requests": 64}).result()
    for role in ("draft", "target"):
        handle.inject_fault.remote(role, "die", at_step=3).result(timeout_s=30)
        assert [r["completion_tokens"] for r in _generate_some(handle)] == [12] * 4
    stats = _wait(lambda: (lambda f: f if f["draft_restarts"] >= 1 and f["draft_up"]
                           and f["target_restarts"] >= 1 else None)(
        handle.stats.remote().result(timeout_s=30)["faults"]), 90, "both workers back")
    assert stats["refused_queued_requests"] >= 1 and stats["draft_fallback_steps"] >= 1
    assert stats["resumed_requests"] >= 1 and stats["target_recovery_seconds"] > 0
    wanted = {f'event="{e}"' for e in ("refused_queued_requests", "draft_fallback_steps",
                                       "draft_restarts", "draft_recovery_seconds",
                                       "target_restarts", "resumed_requests")}

    def scrape():
        text = urllib.request.urlopen(app["metrics"], timeout=10).read().decode()
        found = {e for line in text.splitlines()
                 if line.startswith("ray_specserve_fault_events_total{")
                 and f'application="{APP}"' in line and float(line.rsplit(" ", 1)[1]) > 0
                 for e in wanted if e in line}
        recovered = {w for line in text.splitlines()
                     if line.startswith("ray_specserve_recovery_seconds_count{")
                     and float(line.rsplit(" ", 1)[1]) > 0
                     for w in ("draft", "target") if f'worker="{w}"' in line}
        return (found == wanted and recovered == {"draft", "target"}) or (found, recovered)

    deadline = time.monotonic() + 90
    while (seen := scrape()) is not True and time.monotonic() < deadline:
        time.sleep(1)
    assert seen is True, f"exported so far: {seen}"


def test_router_serves_on_when_the_controller_is_killed(app):
    from deployments.controller import NAMESPACE

    ray, handle = app["ray"], app["handle"]
    before = handle.metrics_snapshot.remote().result(timeout_s=30)["bounds"]
    ray.kill(ray.get_actor(f"SpecController:{APP}", namespace=NAMESPACE))
    _wait(lambda: not handle.metrics_snapshot.remote().result(timeout_s=30)["controller"]["available"],
          30, "the router to notice the controller is gone")
    results = _generate_some(handle, 2)
    assert [r["completion_tokens"] for r in results] == [12, 12]
    snap = handle.metrics_snapshot.remote().result(timeout_s=30)
    assert snap["bounds"] == before and snap["controller"]["available"] is False
