"""The real Ray Serve app on 127.0.0.1: embedded pair, separate draft/target actors.

One app serves the whole module (start-up is the slow part); every front door is used
for real: the official `openai` client over HTTP, a grpc client through Serve's gRPC
proxy, and a DeploymentHandle.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from serve_app import serve_app  # noqa: E402

pytestmark = pytest.mark.slow

APP = "specserve"
MODEL = "specserve-tiny"




@pytest.fixture(scope="module")
def app():
    args = {"model_name": MODEL,
            "engine": {"target": {"num_threads": 2} | _embedded("target"),
                       "draft": {"num_threads": 1} | _embedded("draft"),
                       "speculation": {"num_speculative_tokens": 4},
                       "limits": {"max_model_len": 512, "max_num_seqs": 8, "max_tokens": 256},
                       # Loose budgets: the tests check routing and counting, not the
                       # latency of a shared 2-core machine.
                       "slo": {"classes": [{"name": "interactive", "ttft_s": 30.0,
                                            "tpot_s": 5.0},
                                           {"name": "batch"}]}},
            "max_queued_requests": 16}
    yield from serve_app(args, APP)


def _embedded(role: str) -> dict:
    from specserve_ray.config import EMBEDDED_DRAFT, EMBEDDED_TARGET

    return {"path": EMBEDDED_TARGET if role == "target" else EMBEDDED_DRAFT}


@pytest.fixture(scope="module")
def client(app):
    from openai import OpenAI

    return OpenAI(base_url=app["http"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """Target-only greedy decoding in fp32, in this process (Hugging Face generate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specserve_ray.config import EMBEDDED_TARGET

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_TARGET, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(EMBEDDED_TARGET)

    def greedy(prompt: str, n: int) -> list[int]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
        return out[0, len(ids):].tolist()

    return greedy


PROMPTS = ["def parse_header(line):\n    ", "import os\nimport sys\n\n\nclass ",
           "    for key, value in items:\n        if ", "# Copyright\n\"\"\"Utilities for ",
           "    def __init__(self, name, value=None):\n        self.", "return [x for x in "]


# -- front doors ---------------------------------------------------------------------------------
def test_openai_completions(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    spec = r.model_extra["speculation"]
    assert spec["num_draft_tokens"] >= spec["num_accepted_tokens"] >= 0
    assert spec["mean_acceptance_length"] >= 1.0


def test_openai_completions_stream_with_usage(client):
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    full = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text


def test_sse_ends_with_done(app):
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 5, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", app["http"] + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_openai_chat_and_stream(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a loop."}], max_tokens=8,
        temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "code"},
                               {"role": "user", "content": "def f():"}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens <= 8
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "code"},
                               {"role": "user", "content": "def f():"}], max_tokens=8,
        temperature=0)
    assert streamed == again.choices[0].message.content


def test_models_and_health(app, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(app["http"] + "/health", timeout=10).json() == {"status": "ok"}


def test_sampling_is_seeded(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0.9, top_p=0.95,
                  extra_body={"top_k": 50, "ignore_eos": True})
    a = client.completions.create(seed=7, **kwargs).choices[0].text
    b = client.completions.create(seed=7, **kwargs).choices[0].text
    assert a == b
    # Sampling really samples (a fallback to greedy would give the same text for any seed).
    others = {client.completions.create(seed=s, **kwargs).choices[0].text for s in (8, 9, 10)}
    assert others - {a}


def test_grpc_unary_and_stream(app):
    from deployments.proto import specserve_pb2 as pb
    from deployments.proto import specserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(app["grpc"]) as channel:
        stub = pb_grpc.SpecServeStub(channel)
        meta = (("application", APP),)
        req = pb.GenerateRequest(prompt=PROMPTS[4], max_tokens=9, ignore_eos=True)
        resp = stub.Generate(req, metadata=meta, timeout=120)
        assert resp.finished and resp.finish_reason == "length"
        assert len(resp.token_ids) == 9 and resp.completion_tokens == 9
        assert resp.speculation.num_steps >= 1
        parts = list(stub.GenerateStream(req, metadata=meta, timeout=120))
        assert parts[-1].finished
        assert [t for p in parts for t in p.token_ids] == list(resp.token_ids)
        assert "".join(p.text for p in parts) == resp.text
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt="", max_tokens=4), metadata=meta, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_handle_generate_and_stream(app):
    handle = app["handle"]
    r = handle.generate.remote(PROMPTS[5], max_tokens=7, ignore_eos=True).result()
    assert len(r["token_ids"]) == 7 and r["finish_reason"] == "length"
    deltas = list(handle.options(stream=True).generate.remote(
        PROMPTS[5], stream=True, max_tokens=7, ignore_eos=True))
    assert [t for d in deltas for t in d["token_ids"]] == r["token_ids"]
    assert deltas[-1]["finished"]


def _slo_requests(app) -> dict[str, int]:
    classes = httpx.get(app["http"] + "/v1/stats", timeout=30).json()["slo"]["classes"]
    return {name: c["requests"] for name, c in classes.items()}


def test_slo_class_over_every_front_door(app, client, reference):
    from deployments.proto import specserve_pb2 as pb
    from deployments.proto import specserve_pb2_grpc as pb_grpc

    before = _slo_requests(app)
    assert set(before) == {"interactive", "batch", "best-effort"}
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=11, temperature=0,
                                  extra_body={"slo_class": "interactive", "ignore_eos": True})
    assert r.usage.completion_tokens == 11
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "def f():"}], max_tokens=6,
        temperature=0, stream=True, extra_body={"slo_class": "batch"}))
    assert chunks[-1].choices[0].finish_reason is not None
    with grpc.insecure_channel(app["grpc"]) as channel:
        stub = pb_grpc.SpecServeStub(channel)
        meta = (("application", APP),)
        resp = stub.Generate(pb.GenerateRequest(prompt=PROMPTS[4], max_tokens=8, ignore_eos=True,
                                                slo_class="interactive"),
                             metadata=meta, timeout=120)
        assert list(resp.token_ids) == reference(PROMPTS[4], 8)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt=PROMPTS[4], max_tokens=4, slo_class="gold"),
                          metadata=meta, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown SLO class 'gold'" in err.value.details()
    h = app["handle"].generate.remote(PROMPTS[5], max_tokens=5, ignore_eos=True,
                                      slo_class="batch").result()
    assert h["token_ids"] == reference(PROMPTS[5], 5)
    for stream in (False, True):
        bad = httpx.post(app["http"] + "/v1/completions", timeout=60, json={
            "prompt": "x", "max_tokens": 2, "slo_class": "gold", "stream": stream})
        assert bad.status_code == 400, bad.text
        message = bad.json()["error"]["message"]
        assert "unknown SLO class 'gold'" in message and "interactive" in message
    after = _slo_requests(app)
    assert after["interactive"] - before["interactive"] == 2
    assert after["batch"] - before["batch"] == 2
    assert after["best-effort"] == before["best-effort"]
    interactive = httpx.get(app["http"] + "/v1/stats", timeout=30).json()["slo"]["classes"][
        "interactive"]
    assert interactive["ttft_budget_s"] == 30.0 and interactive["tpot_budget_s"] == 5.0
    assert 0.0 <= interactive["attainment"] <= 1.0 and interactive["mean_ttft_s"] > 0


def test_slo_classes_reconfigure_live(app):
    handle = app["handle"]
    original = {"classes": [{"name": "interactive", "ttft_s": 30.0, "tpot_s": 5.0},
                            {"name": "batch"}]}
    handle.reconfigure.remote({"slo": {"classes": [{"name": "bench", "tpot_s": 4.0}]}}).result()
    try:
        r = handle.generate.remote(PROMPTS[0], max_tokens=3, slo_class="bench").result()
        assert len(r["token_ids"]) == 3
        classes = httpx.get(app["http"] + "/v1/stats", timeout=30).json()["slo"]["classes"]
        assert classes["bench"]["tpot_budget_s"] == 4.0 and "interactive" not in classes
        with pytest.raises(Exception, match="unknown SLO class"):
            handle.generate.remote(PROMPTS[0], max_tokens=3, slo_class="interactive").result()
        with pytest.raises(Exception, match="default_class"):
            handle.reconfigure.remote({"slo": {"default_class": "nope"}}).result()
    finally:
        handle.reconfigure.remote({"slo": original}).result()
    assert handle.generate.remote(PROMPTS[0], max_tokens=2, slo_class="interactive").result()


# -- lossless across actors, batching --------------------------------------------------------------
def test_concurrent_greedy_equals_target_only_and_batches(app, reference):
    handle = app["handle"]
    lengths = [9, 23, 14, 31, 5, 18]
    before = handle.stats.remote().result()
    responses = [handle.generate.remote(p, max_tokens=n, ignore_eos=True)
                 for p, n in zip(PROMPTS, lengths)]
    results = [r.result() for r in responses]
    after = handle.stats.remote().result()
    for p, n, r in zip(PROMPTS, lengths, results):
        assert r["token_ids"] == reference(p, n), p
    steps = after["decode_steps"] - before["decode_steps"]
    calls = after["target_calls"] - before["target_calls"]
    rows = (after["mean_batch_size"] * after["decode_steps"]
            - before["mean_batch_size"] * before["decode_steps"])
    # One target call per step carries every running request: far fewer calls than rows.
    assert after["target_calls_per_step"] == 1.0
    assert calls <= steps + len(PROMPTS)          # + admission-only steps
    assert rows / steps > 2.0, (rows, steps)


def test_policy_switch_keeps_greedy_equality(app, reference):
    """Reconfigure the live app to the adaptive policy (profiles once), then back."""
    handle = app["handle"]
    handle.reconfigure.remote({"policy": "specserve", "profile_budget_s": 3.0}).result()
    try:
        stats = handle.stats.remote().result()
        assert stats["policy"] == "specserve"
        lengths = [21, 13]
        responses = [handle.generate.remote(p, max_tokens=n, ignore_eos=True)
                     for p, n in zip(PROMPTS[:2], lengths)]
        for p, n, r in zip(PROMPTS, lengths, responses):
            assert r.result()["token_ids"] == reference(p, n), p
        stats = httpx.get(app["http"] + "/v1/stats", timeout=30).json()
        assert stats["policy"] == "specserve"
        assert 0.0 <= stats["mean_chosen_k"] <= 4.0
        with pytest.raises(Exception, match="unknown speculation policy"):
            handle.reconfigure.remote({"policy": "bogus"}).result()
        assert handle.stats.remote().result()["policy"] == "specserve"
    finally:
        handle.reconfigure.remote({"policy": "static"}).result()
    stats = handle.stats.remote().result()
    assert stats["policy"] == "static"
    r = handle.generate.remote(PROMPTS[2], max_tokens=9, ignore_eos=True).result()
    assert r["token_ids"] == reference(PROMPTS[2], 9)
    assert handle.stats.remote().result()["mean_chosen_k"] > 0   # static k = 4 again


def test_pipelining_keeps_greedy_equality(app, reference):
    """Two micro-batches in flight (draft one while the target verifies the other)."""
    handle = app["handle"]
    handle.reconfigure.remote({"pipeline": True}).result()
    try:
        before = handle.stats.remote().result()
        lengths = [19, 7, 26, 12]
        responses = [handle.generate.remote(p, max_tokens=n, ignore_eos=True)
                     for p, n in zip(PROMPTS, lengths)]
        for p, n, r in zip(PROMPTS, lengths, responses):
            assert r.result()["token_ids"] == reference(p, n), p
        after = handle.stats.remote().result()
        assert after["pipeline"] is True
        assert after["overlapped_steps"] > before["overlapped_steps"]
        with pytest.raises(Exception, match="pipeline must be"):
            handle.reconfigure.remote({"pipeline": "yes"}).result()
    finally:
        handle.reconfigure.remote({"pipeline": False}).result()
    assert handle.stats.remote().result()["pipeline"] is False


# -- stress: cancellation, backpressure, bad input ---------------------------------------------------
def _worker_seqs(app) -> tuple[int, int]:
    s = app["handle"].worker_stats.remote().result()
    return s["target"]["num_seqs"], s["draft"]["num_seqs"]


def test_client_disconnect_frees_caches(app):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 250, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", app["http"] + "/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break   # leaving the block closes the connection mid-stream
    deadline = time.time() + 30
    while time.time() < deadline and _worker_seqs(app) != (0, 0):
        time.sleep(0.2)
    assert _worker_seqs(app) == (0, 0)


def test_handle_cancel_frees_caches(app):
    resp = app["handle"].generate.remote(PROMPTS[1], max_tokens=250, ignore_eos=True)
    deadline = time.time() + 30
    while time.time() < deadline and _worker_seqs(app) == (0, 0):
        time.sleep(0.05)
    assert _worker_seqs(app) == (1, 1), "the request must be running when it is cancelled"
    resp.cancel()
    deadline = time.time() + 30
    while time.time() < deadline and _worker_seqs(app) != (0, 0):
        time.sleep(0.2)
    assert _worker_seqs(app) == (0, 0)


def test_backpressure_answers_429_not_hang(app):
    handle = app["handle"]
    handle.reconfigure.remote({"max_num_seqs": 1, "max_queued_requests": 1}).result()
    try:
        body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 40, "ignore_eos": True,
                "temperature": 0}

        def post(_):
            return httpx.post(app["http"] + "/v1/completions", json=body, timeout=120)

        with ThreadPoolExecutor(8) as pool:
            statuses = [r.status_code for r in pool.map(post, range(8))]
        assert set(statuses) <= {200, 429}
        assert 429 in statuses and 200 in statuses
        r503 = [r for r in (post(0) for _ in range(1))]  # a single request still succeeds
        assert r503[0].status_code == 200
    finally:
        handle.reconfigure.remote({"max_num_seqs": 8, "max_queued_requests": 16}).result()


@pytest.mark.parametrize("payload,needle", [
    (b'{"prompt": "x", "max_tokens": 4', "invalid request"),                 # malformed JSON
    (b'{"prompt": "x", "max_tokens": "many"}', "max_tokens"),                 # wrong type
    (b'{"prompt": 12.5}', "prompt"),                                           # wrong type
    (b'{"model": "gpt-4", "prompt": "x"}', "not served here"),                # unknown model
    (b'{"prompt": "' + b"x = 1\\n" * 400 + b'", "max_tokens": 4}', "context"),  # too long
    (b'{"prompt": "x", "max_tokens": 100000}', "exceeds the limit"),
    (b'{"prompt": "x", "temperature": -1}', "temperature must be >= 0"),
    (b'{"prompt": "x", "top_p": 0}', "top_p"),
    (b'{"prompt": "\xff\xfe bad utf8"}', "invalid request"),                  # invalid UTF-8
    (b'{"prompt": "", "max_tokens": 4}', "prompt is empty"),
    (b'{"prompt": "x", "n": 3}', "n > 1 is not supported"),
    (b'{"prompt": "x", "slo_class": "gold"}', "unknown SLO class"),
    (b'{"prompt": "x", "slo_class": 7}', "slo_class"),
])
def test_bad_input_gets_400_and_server_lives(app, payload, needle):
    r = httpx.post(app["http"] + "/v1/completions", content=payload,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    ok = httpx.post(app["http"] + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200
