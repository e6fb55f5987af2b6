"""Pure parts of the front door: API keys, error mapping, Retry-After, queue bounds,
the typed user_config, and the FrontDoor's id namespacing and limits (over a stub loop:
these check the door's own decisions, not serving; the served path is in
test_front_door.py)."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from specserve_ray.admission import DrainMeter, QueueBounds, retry_after_s
from specserve_ray.api.auth import ENV_VAR, ApiKeyCheck, AuthError, load_keys, parse_keys
from specserve_ray.api.error_map import (classify, grpc_details, grpc_trailers, http_headers,
                                         openai_body)
from specserve_ray.config import AppConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.errors import (OverloadedError, PayloadTooLargeError, RequestError,
                                  UnavailableError)
from specserve_ray.front_config import FrontDoorConfig, serve_queue_problem
from specserve_ray.user_config import UserConfig


# -- API keys ---------------------------------------------------------------------------------
def test_keys_from_env_and_file(tmp_path):
    assert parse_keys(" a1 , b2,,") == ["a1", "b2"]
    f = tmp_path / "keys"
    f.write_text("# team keys\nk-one\n\n  k-two  # rotated monthly\n")
    assert load_keys({ENV_VAR: "e1,e2"}, str(f)) == ["e1", "e2", "k-one", "k-two"]
    assert load_keys({}, None) == []
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_keys({}, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot be read"):
        load_keys({}, str(tmp_path / "missing"))


def test_key_check():
    open_door = ApiKeyCheck([])
    assert not open_door.enabled
    open_door.check_header(None)                       # no keys: everyone in
    check = ApiKeyCheck(["s3cret", "other-key"])
    check.check_header("Bearer s3cret")
    check.check_header(b"bearer other-key")
    check.check_metadata([("application", "x"), ("authorization", "Bearer other-key")])
    for bad in (None, "", "s3cret", "Bearer", "Bearer s3cre", "Bearer s3cretX", "Basic s3cret",
                "Bearer S3CRET", b"Bearer \xff"):
        with pytest.raises(AuthError) as err:
            check.check_header(bad)
        assert "s3cret" not in str(err.value)          # never echoed
    with pytest.raises(AuthError, match="missing"):
        check.check_metadata([("application", "x")])


def test_key_check_is_constant_time(monkeypatch):
    """Every configured key is compared with hmac.compare_digest, none skipped."""
    import specserve_ray.api.auth as auth

    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest",
                        lambda a, b: calls.append(b) or real(a, b))
    ApiKeyCheck(["k1", "k2", "k3"]).check_header("Bearer k1")
    assert calls == [b"k1", b"k2", b"k3"]


# -- error mapping ------------------------------------------------------------------------------
def test_error_mapping_table():
    from specserve_ray.supervision import RequestTimeout

    bad = RequestError("top_k must be an integer")
    bad.param = "top_k"
    cases = [
        (bad, 400, "INVALID_ARGUMENT", "invalid_request_error"),
        (AuthError("invalid API key"), 401, "UNAUTHENTICATED", "invalid_request_error"),
        (PayloadTooLargeError("too big"), 413, "INVALID_ARGUMENT", "invalid_request_error"),
        (OverloadedError("queue full", 7.2), 429, "RESOURCE_EXHAUSTED", "rate_limit_error"),
        (UnavailableError("target restarting"), 503, "UNAVAILABLE", "server_error"),
        (RuntimeError("boom"), 500, "INTERNAL", "server_error"),
        (RequestTimeout("request req-1 passed its deadline"), 504, "DEADLINE_EXCEEDED",
         "timeout_error"),
    ]
    for exc, status, code, err_type in cases:
        reply = classify(exc, retry_after_s=3)
        assert (reply.status, reply.grpc_code, reply.err_type) == (status, code, err_type), exc
    assert openai_body(classify(bad))["error"]["param"] == "top_k"
    assert classify(OverloadedError("full", 7.2)).retry_after_s == 7      # the error's own hint
    assert classify(OverloadedError("full"), retry_after_s=4).retry_after_s == 4
    assert http_headers(classify(OverloadedError("full"), 4))["Retry-After"] == "4"
    reply = classify(OverloadedError("full"), 4)
    assert ("retry-after", "4") in grpc_trailers(reply) and "retry after 4 s" in grpc_details(reply)
    with pytest.raises(ValidationError) as err:
        SamplingParams(top_p=0)
    assert classify(err.value).status == 400 and "top_p" in classify(err.value).message


def test_server_errors_carry_no_internals():
    leak = RuntimeError("ray::TargetActor.step() (pid=4242, ip=10.0.0.7, actor_id=ab12)\n"
                        "Traceback (most recent call last):\n  File \"/srv/x.py\", line 3")
    reply = classify(leak)
    body = json.dumps(openai_body(reply))
    for secret in ("pid", "4242", "10.0.0.7", "Traceback", "TargetActor", "x.py"):
        assert secret not in body and secret not in grpc_details(reply)
    assert reply.error_id and reply.error_id in reply.message
    assert http_headers(reply)["X-Error-Id"] == reply.error_id
    assert classify(RuntimeError("x")).error_id != reply.error_id


# -- Retry-After and queue bounds ---------------------------------------------------------------
def test_retry_after_estimate():
    assert retry_after_s(9, 2.0, 1, 60) == 5            # (9 + 1) / 2 per second
    assert retry_after_s(0, 50.0, 1, 60) == 1           # floor
    assert retry_after_s(1000, 0.5, 1, 60) == 60        # ceiling
    assert retry_after_s(3, 0.0, 1, 60) == 60           # nothing drains: the ceiling


def test_drain_meter_window():
    meter = DrainMeter(window_s=10)
    meter.start(0.0)
    assert meter.rate(5.0) == 0.0
    for t in (1.0, 2.0, 3.0, 4.0):
        meter.observe_finish(t)
    assert meter.rate(4.0) == pytest.approx(1.0)        # 4 finishes over 4 s
    assert meter.rate(12.0) == pytest.approx(0.3)       # 3 left in [2, 12]
    assert meter.rate(100.0) == 0.0


def test_queue_bounds_requests_and_tokens():
    bounds = QueueBounds(max_queued_requests=2, max_queued_tokens=100)
    assert bounds.check(0, 0, 500) is None              # an empty queue takes anything
    assert bounds.check(1, 40, 60) is None
    assert bounds.check(1, 40, 61).reason == "queued_tokens"
    assert bounds.check(2, 0, 1).reason == "queued_requests"
    assert QueueBounds(0).check(0, 0, 1).reason == "queued_requests"


def test_serve_queue_rule():
    assert serve_queue_problem(128, 16, 64) is None and serve_queue_problem(80, 16, 64) is None
    assert "below engine.limits.max_num_seqs" in serve_queue_problem(64, 32, 128)


def test_build_app_refuses_a_config_serve_would_queue():
    """A user config with max_ongoing_requests < max_num_seqs + max_queued_requests fails
    at build time, naming the keys and values (the shipped configs pass: test_manifests)."""
    from deployments.app import build_app

    with pytest.raises(ValueError) as err:
        build_app({"max_ongoing_requests": 40, "max_queued_requests": 32,
                   "engine": {"limits": {"max_num_seqs": 16}}})
    message = str(err.value)
    for needle in ("invalid app args", "max_ongoing_requests (40)",
                   "engine.limits.max_num_seqs + max_queued_requests (16 + 32 = 48)"):
        assert needle in message, message
    build_app({"max_ongoing_requests": 48, "max_queued_requests": 32,
               "engine": {"limits": {"max_num_seqs": 16}}})          # exactly enough: fine


# -- typed configs -----------------------------------------------------------------------------
def test_user_config_model():
    knobs = UserConfig.parse({"num_speculative_tokens": 3, "max_num_seqs": 4, "pipeline": True,
                              "max_queued_tokens": 4096, "policy": "threshold:0.4",
                              "slo": {"classes": [{"name": "bench", "tpot_s": 1.0}]}})
    assert knobs.max_num_seqs == 4 and knobs.slo.class_names == ["bench", "best-effort"]
    assert UserConfig.parse(None) == UserConfig()
    for bad, needle in [({"max_num_seq": 4}, "max_num_seq: unknown user_config key"),
                        ({"pipeline": "yes"}, "pipeline must be true or false"),
                        ({"max_num_seqs": "8"}, "max_num_seqs"),
                        ({"max_num_seqs": 0}, "max_num_seqs"),
                        ({"num_speculative_tokens": 17}, "num_speculative_tokens"),
                        ({"policy": "bogus"}, "unknown speculation policy"),
                        ({"slo": {"default_class": "nope"}}, "default_class"),
                        ([1, 2], "must be a mapping")]:
        with pytest.raises(ValueError, match=needle):
            UserConfig.parse(bad)
    with pytest.raises(ValueError, match=r"max_num_seqs must be in \[1, 8\]"):
        UserConfig.parse({"max_num_seqs": 9}).check_against(8)


def test_front_config_in_app_config():
    cfg = AppConfig.model_validate({"front": {"max_body_bytes": 4096, "max_queued_tokens": 10}})
    assert cfg.front.max_body_bytes == 4096
    with pytest.raises(ValidationError, match="extra"):
        AppConfig.model_validate({"front": {"max_body": 1}})
    with pytest.raises(ValidationError, match="retry_after_min_s"):
        FrontDoorConfig(retry_after_min_s=10, retry_after_max_s=5)


# -- FrontDoor decisions (stub step loop) -----------------------------------------------------
class _StubLoop:
    """Records what reaches the step loop; finishes every request in one delta."""

    def __init__(self):
        from specserve_ray.metrics import FaultCounts

        self.engine = SimpleNamespace(waiting=[], limits=SimpleNamespace(max_model_len=64))
        self.max_queued = None
        self.seen_ids = []
        self.faults = FaultCounts()

    async def generate_stream(self, prompt_ids, params, request_id, k, slo_class, timeout_s=None):
        from specserve_ray.engine import RequestOutput
        from specserve_ray.stats import SpecStats

        self.seen_ids.append(request_id)
        yield RequestOutput(request_id, [1], "a", True, "length", len(prompt_ids), 1,
                            SpecStats())


@pytest.fixture()
def door():
    from transformers import AutoTokenizer

    from specserve_ray.api.front import FrontDoor
    from specserve_ray.config import EMBEDDED_TARGET

    tok = AutoTokenizer.from_pretrained(EMBEDDED_TARGET)
    return FrontDoor(_StubLoop(), tok, FrontDoorConfig(max_stop_strings=2, max_stop_chars=5),
                     max_queued_requests=1)


def test_client_ids_are_labels_only(door):
    async def run():
        a = await door.generate("x = 1", SamplingParams(max_tokens=1), "same")
        b = await door.generate("x = 1", SamplingParams(max_tokens=1), "same")
        c = await door.generate("x = 1", SamplingParams(max_tokens=1))
        return a, b, c

    a, b, c = asyncio.run(run())
    assert a["request_id"] == b["request_id"] == "same"          # echoed back
    internal = door.serving.seen_ids
    assert len(set(internal)) == 3 and "same" not in internal    # the engine's ids are ours
    assert all(i.startswith("srv-") for i in internal) and c["request_id"] == internal[2]
    for bad in (["list"], {"d": 1}, 7, "x" * 200, "tab\tid"):
        with pytest.raises(RequestError, match="request_id"):
            asyncio.run(door.generate("x", SamplingParams(max_tokens=1), bad))


def test_limits_before_the_loop(door):
    loop = door.serving
    with pytest.raises(RequestError, match="at most 2 stop strings"):
        asyncio.run(door.generate("x", SamplingParams(stop=["a", "b", "c"])))
    with pytest.raises(RequestError, match="at most 5 characters"):
        asyncio.run(door.generate("x", SamplingParams(stop=["abcdef"])))
    with pytest.raises(RequestError, match="characters, more than 63 tokens"):
        asyncio.run(door.generate("y" * (63 * door._longest_token + 1), SamplingParams()))
    with pytest.raises(RequestError, match="the context holds 64"):
        asyncio.run(door.generate([5] * 64, SamplingParams()))
    loop.engine.waiting = [SimpleNamespace(prompt_ids=[1], params=SamplingParams())]
    with pytest.raises(OverloadedError) as err:
        asyncio.run(door.generate("x", SamplingParams()))
    assert 1 <= err.value.retry_after_s <= 60 and door.refusals == {"queued_requests": 1}
    assert loop.faults.counts["refused_queued_requests"] == 1      # exported with the faults
    early = door.refuse_early()          # the HTTP guard's check, before the body is read
    assert isinstance(early, OverloadedError) and early.retry_after_s >= 1
    assert door.refusals == {"queued_requests": 2}
    loop.engine.waiting = []
    assert door.refuse_early() is None   # a request that could fit is never refused early
    assert loop.seen_ids == []                                   # nothing reached the loop
