"""deployments/default.yaml, deployed as `serve deploy` / a RayService would deploy it.

The offline tests (test_manifests.py) read the file against Ray's schema; this one hands
it to a real Serve controller on 127.0.0.1 (ports swapped for free ones) and checks that
Serve applied the settings the file ships (timeouts, bounded queue with Retry-After,
graceful drain) and that the app answers over HTTP and gRPC.
"""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from helpers import free_port as _free_port  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APP = "specserve"
ROUTER_FIELDS = ("max_ongoing_requests", "max_queued_requests", "backpressure_config",
                 "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s")




@pytest.fixture(scope="module")
def deployed():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    with open(ROOT / "deployments" / "default.yaml", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    assert config["http_options"]["host"] == "127.0.0.1"
    config["http_options"]["port"] = _free_port()
    config["grpc_options"]["port"] = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    try:
        serve.start(http_options=config["http_options"], grpc_options=config["grpc_options"])
        client = _get_global_client()
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
        yield config, client.get_serve_details()
    finally:
        serve.shutdown()
        ray.shutdown()


def test_serve_applies_the_shipped_settings(deployed):
    from ray.serve._private.config import DeploymentConfig

    config, details = deployed
    [app] = config["applications"]
    [router] = app["deployments"]
    defaults = DeploymentConfig().model_dump(mode="json")
    for field in ROUTER_FIELDS:        # else the comparison below could pass unapplied
        assert defaults[field] != router[field], f"{field} ships Serve's default"
    applied = details["applications"][APP]["deployments"][router["name"]]
    assert applied["status"] == "HEALTHY"
    for field in ROUTER_FIELDS:
        value = applied["deployment_config"][field]
        assert value == router[field], (field, value, router[field])
    for section in ("http_options", "grpc_options"):
        assert details[section]["request_timeout_s"] == config[section]["request_timeout_s"]


def test_shipped_app_answers_http_and_grpc(deployed):
    from deployments.proto import specserve_pb2 as pb
    from deployments.proto import specserve_pb2_grpc as pb_grpc

    config, _ = deployed
    model = config["applications"][0]["args"]["model_name"]
    r = httpx.post(f"http://127.0.0.1:{config['http_options']['port']}/v1/completions",
                   json={"model": model, "prompt": "Once upon a time", "max_tokens": 6,
                         "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6
    with grpc.insecure_channel(f"127.0.0.1:{config['grpc_options']['port']}") as channel:
        stub = pb_grpc.SpecServeStub(channel)
        resp = stub.Generate(pb.GenerateRequest(prompt="Once upon", max_tokens=5,
                                                ignore_eos=True),
                             metadata=(("application", APP),), timeout=120)
    assert resp.finished and resp.completion_tokens == 5
