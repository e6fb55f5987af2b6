"""The front door on the served path: a real Serve app on 127.0.0.1 with an API key.

One app for the module (start-up is the slow part): API keys over HTTP (openai client,
httpx) and gRPC, the body-size bound, overload answers with Retry-After, server errors
without internals, client disconnects freeing slots, and client request ids that cannot
reach other requests.
"""
from __future__ import annotations

import glob
import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from test_deployment import PROMPTS, _embedded
from serve_app import serve_app  # noqa: E402

pytestmark = pytest.mark.slow

APP = "frontdoor"
MODEL = "specserve-tiny"
KEY = "sk-test-8c1f2e"
AUTH = {"authorization": f"Bearer {KEY}"}
GRPC_META = (("application", APP), ("authorization", f"Bearer {KEY}"))
BODY_LIMIT = 64 * 1024
# A template that fails at render time with a Python error (not a client mistake): the
# way this test gets a genuine 500 from the served path.
BROKEN_TEMPLATE = "{{ messages | length / 0 }}"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "api_keys"
    key_file.write_text(f"# test keys\n{KEY}\n")
    args = {"model_name": MODEL,
            "engine": {"target": {"num_threads": 1} | _embedded("target"),
                       "draft": {"num_threads": 1} | _embedded("draft"),
                       "limits": {"max_model_len": 512, "max_num_seqs": 4, "max_tokens": 300}},
            "max_queued_requests": 8, "max_ongoing_requests": 64,
            "chat_template": BROKEN_TEMPLATE,
            "signals": {"export_metrics": False},
            "front": {"api_key_file": str(key_file), "max_body_bytes": BODY_LIMIT}}
    yield from serve_app(args, APP)


def _stub(app):
    from deployments.proto import specserve_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(app["grpc"])
    return channel, pb_grpc.SpecServeStub(channel)


def _worker_seqs(app) -> tuple[int, int]:
    s = app["handle"].worker_stats.remote().result()
    return s["target"]["num_seqs"], s["draft"]["num_seqs"]


def _wait_seqs_zero(app, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s and _worker_seqs(app) != (0, 0):
        time.sleep(0.1)
    assert _worker_seqs(app) == (0, 0)
    return time.monotonic() - start


# -- API keys ------------------------------------------------------------------------------------
def test_http_needs_the_key(app):
    from openai import AuthenticationError, OpenAI

    url = app["http"]
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
                    {"authorization": f"Basic {KEY}"}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and KEY not in r.text
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}   # stays open
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=MODEL, prompt="x", max_tokens=2)
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_grpc_needs_the_key(app):
    from deployments.proto import specserve_pb2 as pb

    req = pb.GenerateRequest(prompt=PROMPTS[4], max_tokens=3, ignore_eos=True)
    channel, stub = _stub(app)
    with channel:
        for meta in ((("application", APP),),
                     (("application", APP), ("authorization", "Bearer wrong"))):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(req, metadata=meta, timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert KEY not in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.GenerateStream(req, metadata=meta, timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        resp = stub.Generate(req, metadata=GRPC_META, timeout=120)
        assert resp.completion_tokens == 3


# -- limits ----------------------------------------------------------------------------------------
def test_oversized_body_is_refused_fast(app):
    url = app["http"] + "/v1/completions"
    big = b'{"prompt": "' + b"x" * (20 << 20) + b'", "max_tokens": 2}'   # 20 MB
    start = time.monotonic()
    r = httpx.post(url, content=big, headers={**AUTH, "content-type": "application/json"},
                   timeout=30)
    elapsed = time.monotonic() - start
    assert r.status_code == 413, r.text[:200]
    print(f"\n413 for a 20 MB body after {elapsed:.3f} s")
    assert elapsed < 1.0, elapsed
    assert "max_body_bytes" in r.json()["error"]["message"]

    def chunks():              # no Content-Length: counted as the bytes arrive
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 4096
        yield b'", "max_tokens": 2}'

    r = httpx.post(url, content=chunks(), headers={**AUTH, "content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413, r.text[:200]
    # Under the body bound but more characters than the context can hold: refused before
    # tokenizing (400), and the server answers the next request as usual.
    r = httpx.post(url, json={"prompt": "z" * 60_000, "max_tokens": 2}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
    ok = httpx.post(url, json={"prompt": "x", "max_tokens": 2}, headers=AUTH, timeout=60)
    assert ok.status_code == 200


def test_overload_answers_429_with_retry_after(app):
    from deployments.proto import specserve_pb2 as pb

    handle = app["handle"]
    handle.reconfigure.remote({"max_num_seqs": 1, "max_queued_requests": 1}).result()
    try:
        body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 60, "ignore_eos": True,
                "temperature": 0}

        def post(_, tokens=60):
            return httpx.post(app["http"] + "/v1/completions",
                              json={**body, "max_tokens": tokens}, headers=AUTH, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
            channel, stub = _stub(app)
            with channel:
                # Keep the queue full while gRPC asks too.
                # Long enough (300 tokens: seconds, not the ~0.3 s of 60 tokens at ~3
                # tokens per step) that the slot and the queue are still taken below.
                busy = [pool.submit(post, i, 300) for i in range(3)]
                time.sleep(0.5)
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(pb.GenerateRequest(prompt=PROMPTS[2], max_tokens=5),
                                  metadata=GRPC_META, timeout=60)
                trailers = dict(err.value.trailing_metadata() or ())
                # The queue is full: refused before the body is read (a body that is not
                # even JSON gets the 429, not a 400).
                early = httpx.post(app["http"] + "/v1/completions", content=b"{not json",
                                   headers={**AUTH, "content-type": "application/json"},
                                   timeout=60)
                [b.result() for b in busy]
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses, statuses
        for r in responses:
            if r.status_code == 429:
                assert 1 <= int(r.headers["retry-after"]) <= 60
                assert r.json()["error"]["type"] == "rate_limit_error"
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 1 <= int(trailers["retry-after"]) <= 60 and "retry after" in err.value.details()
        assert early.status_code == 429, early.text
        assert 1 <= int(early.headers["retry-after"]) <= 60
        stats = handle.stats.remote().result()
        admission = stats["admission"]
        assert admission["refusals"]["queued_requests"] >= 3
        assert admission["drain_rate_per_s"] > 0
        # Refusals by reason also travel with the fault events (Prometheus fault_events).
        assert stats["faults"]["refused_queued_requests"] == admission["refusals"]["queued_requests"]
    finally:
        handle.reconfigure.remote({"max_num_seqs": 4, "max_queued_requests": 8}).result()


def test_user_config_that_lets_serve_queue_is_refused(app):
    """max_num_seqs + max_queued_requests above the deployment's max_ongoing_requests (64
    here): a clear error naming keys and values, and nothing changes."""
    handle = app["handle"]
    with pytest.raises(Exception) as err:
        handle.reconfigure.remote({"max_queued_requests": 61}).result()
    message = str(err.value)
    assert "invalid user_config" in message and "max_ongoing_requests (64)" in message, message
    assert "(4 + 61 = 65)" in message, message
    assert handle.stats.remote().result()["admission"]["max_queued_requests"] == 8
    handle.reconfigure.remote({"max_queued_requests": 60}).result()     # 4 + 60 = 64: fine
    handle.reconfigure.remote({"max_queued_requests": 8}).result()


@pytest.mark.slow   # ~10 s: Serve retries the failing replica before it gives up
def test_deployment_settings_that_let_serve_queue_fail_the_replica(app):
    """build_app cannot see a Serve config's `deployments:` override of
    max_ongoing_requests; the replica checks its real setting and refuses to start."""
    from ray import serve
    from ray.serve import Application

    from deployments.app import build_app

    tiny = {"CPU": 0.01}         # beside the module's app on a 2-CPU Ray instance
    good = build_app({"engine": {"limits": {"max_num_seqs": 4}}, "max_queued_requests": 8,
                      "router_resources": tiny, "draft_resources": tiny,
                      "target_resources": tiny})
    bad = Application(good._bound_deployment.options(max_ongoing_requests=10))
    try:
        with pytest.raises(Exception, match="frontdoor-bad failed"):
            serve.run(bad, name="frontdoor-bad", route_prefix="/bad")
        status = serve.status().applications["frontdoor-bad"]
        message = status.deployments["SpecRouter"].message
        assert "invalid deployment settings" in message, message
        assert "max_ongoing_requests (10)" in message and "(4 + 8 = 12)" in message, message
    finally:
        serve.delete("frontdoor-bad")


def test_token_queue_bound(app):
    handle = app["handle"]
    handle.reconfigure.remote({"max_num_seqs": 1, "max_queued_tokens": 100}).result()
    try:
        body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 80, "ignore_eos": True}

        def post(_, tokens=60):
            return httpx.post(app["http"] + "/v1/completions",
                              json={**body, "max_tokens": tokens}, headers=AUTH, timeout=120)

        with ThreadPoolExecutor(4) as pool:
            statuses = [r.status_code for r in pool.map(post, range(4))]
        assert 429 in statuses and 200 in statuses, statuses
        stats = handle.stats.remote().result()
        refusals = stats["admission"]["refusals"]
        assert refusals.get("queued_tokens", 0) >= 1
        assert stats["faults"]["refused_queued_tokens"] == refusals["queued_tokens"]
    finally:
        handle.reconfigure.remote({"max_num_seqs": 4, "max_queued_tokens": 1 << 30}).result()


# -- server errors ---------------------------------------------------------------------------------
def test_server_error_body_has_no_internals(app):
    url = app["http"] + "/v1/chat/completions"
    for stream in (False, True):
        r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "stream": stream}, headers=AUTH, timeout=60)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        for internal in ("ZeroDivision", "division", "Traceback", "pid", "File "):
            assert internal not in r.text
        error_id = r.headers["x-error-id"]
        assert error_id in err["message"] and err["type"] == "server_error"
    # The same id is in the replica's log line, with the real cause.
    deadline = time.time() + 10
    found = False
    while time.time() < deadline and not found:
        for path in glob.glob(os.path.join(app["logs"], "**", "*"), recursive=True):
            if not os.path.isfile(path):
                continue
            with open(path, errors="replace") as f:
                text = f.read()
            if error_id in text and "ZeroDivisionError" in text:
                found = True
        time.sleep(0.5)
    assert found, "the error id and its cause should be in the replica log"


# -- disconnects and ids ---------------------------------------------------------------------------
def test_disconnect_frees_slots_within_5s(app):
    from deployments.proto import specserve_pb2 as pb

    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 280, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", app["http"] + "/v1/completions", json=body, headers=AUTH,
                      timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
        assert _worker_seqs(app)[0] == 1          # the request holds a target slot
    closed = time.monotonic()                    # the connection is closed here
    _wait_seqs_zero(app, 5.0)
    print(f"\nslots free {time.monotonic() - closed:.2f} s after the HTTP client left")
    assert time.monotonic() - closed < 5.0
    channel, stub = _stub(app)
    with channel:
        call = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[1], max_tokens=280,
                                                      ignore_eos=True),
                                   metadata=GRPC_META, timeout=120)
        next(call), next(call)
        assert _worker_seqs(app)[0] == 1
        call.cancel()
        print(f"slots free {_wait_seqs_zero(app, 5.0):.2f} s after the gRPC cancel")


def test_client_request_ids_cannot_touch_other_requests(app):
    from deployments.proto import specserve_pb2 as pb

    handle = app["handle"]
    # Two requests with the same client id run side by side, each whole.
    a = handle.generate.remote(PROMPTS[3], max_tokens=40, ignore_eos=True, request_id="mine")
    b = handle.generate.remote(PROMPTS[3], max_tokens=40, ignore_eos=True, request_id="mine")
    ra, rb = a.result(), b.result()
    assert ra["request_id"] == rb["request_id"] == "mine"
    assert ra["token_ids"] == rb["token_ids"] and len(ra["token_ids"]) == 40
    # Unhashable / invalid ids are the caller's error and the loop lives on.
    for bad in (["x"], {"k": 1}, "a" * 500):
        with pytest.raises(Exception, match="request_id"):
            handle.generate.remote("x", max_tokens=2, request_id=bad).result()
    channel, stub = _stub(app)
    with channel:
        resp = stub.Generate(pb.GenerateRequest(prompt=PROMPTS[4], max_tokens=2,
                                                request_id="client-7"),
                             metadata=GRPC_META, timeout=120)
        assert resp.request_id == "client-7"
    assert len(handle.generate.remote("x", max_tokens=2).result()["token_ids"]) >= 1


def test_stop_strings_exact_on_the_served_path(app):
    """Stops cut at random places of a greedy output (so they span speculative steps):
    streamed and non-streamed text both end right before the stop, and the reported
    token count is that of the kept text."""
    import json
    import random

    from transformers import AutoTokenizer

    from specserve_ray.config import EMBEDDED_TARGET

    tok = AutoTokenizer.from_pretrained(EMBEDDED_TARGET, local_files_only=True)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0,
            "ignore_eos": True}
    ref = app["handle"].generate.remote(PROMPTS[0], max_tokens=48, temperature=0,
                                        ignore_eos=True).result()
    full, ids = ref["text"], ref["token_ids"]

    def tokens_reaching(n_chars):       # the fewest output tokens whose text covers n_chars
        return next(m for m in range(len(ids) + 1)
                    if len(tok.decode(ids[:m]).rstrip("\ufffd")) >= n_chars)

    with httpx.Client(timeout=120, headers=AUTH) as client:
        rng = random.Random(7)
        for _ in range(6):
            start = rng.randrange(1, len(full) - 6)
            stop = full[start:start + rng.randint(2, 5)]
            expected = full[:full.find(stop)]
            r = client.post(app["http"] + "/v1/completions", json=body | {"stop": [stop]}).json()
            assert r["choices"][0]["text"] == expected and r["choices"][0]["finish_reason"] == "stop"
            assert r["usage"]["completion_tokens"] == tokens_reaching(len(expected))
            streamed = []
            with client.stream("POST", app["http"] + "/v1/completions",
                               json=body | {"stop": [stop], "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        streamed.append(json.loads(line[6:])["choices"][0]["text"])
            assert "".join(streamed) == expected, (stop, streamed)


def test_api_key_never_in_a_log_line(app):
    """Runs after the auth tests (file order): no log file of the app holds the key."""
    hits = []
    for path in glob.glob(os.path.join(app["logs"], "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if KEY.encode() in f.read():
                    hits.append(path)
    assert not hits, hits
