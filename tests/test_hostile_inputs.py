"""Hostile requests against the real Serve app (HTTP, gRPC, DeploymentHandle) while
well-formed greedy streams decode beside them.

Every hostile request must get a 4xx (INVALID_ARGUMENT over gRPC, a RequestError through
the handle) with a clear message and OpenAI's error shape; the streams must finish whole
and token for token equal to an undisturbed run; afterwards no worker holds a sequence.
The table lives in tests/hostile_cases.py (the pure tests in test_request_validation.py
check the same cases at the validation layer alone).
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from hostile_cases import ACCEPTED, CASES, Case, comp
from serve_app import serve_app  # noqa: E402

pytestmark = pytest.mark.slow

APP = "hostile"
# Long enough that every hostile request lands while the streams decode.
GOOD = [("def parse_header(line):\n    ", 160), ("import os\nimport sys\n\n\nclass ", 150),
        ("    for key, value in items:\n        if ", 140)]




@pytest.fixture(scope="module")
def app():
    args = {"engine": {"target": {"num_threads": 1}, "draft": {"num_threads": 1},
                       "limits": {"max_model_len": 256, "max_num_seqs": 8, "max_tokens": 200}},
            "signals": {"export_metrics": False}, "max_queued_requests": 64}
    yield from serve_app(args, APP)


def _http_stream(base: str, prompt: str, n: int, started: threading.Event) -> dict:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    text, finish, usage = [], None, None
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
                started.set()
            usage = chunk.get("usage") or usage
    return {"text": "".join(text), "finish": finish, "tokens": usage["completion_tokens"],
            "done_at": time.monotonic()}


def _grpc_stream(target: str, prompt: str, n: int, started: threading.Event) -> dict:
    from deployments.proto import specserve_pb2 as pb
    from deployments.proto import specserve_pb2_grpc as pb_grpc

    text, finish, tokens = [], None, 0
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SpecServeStub(channel)
        req = pb.GenerateRequest(prompt=prompt, max_tokens=n, ignore_eos=True)
        for part in stub.GenerateStream(req, metadata=(("application", APP),), timeout=300):
            text.append(part.text)
            tokens = part.completion_tokens
            finish = part.finish_reason or finish
            started.set()
    return {"text": "".join(text), "finish": finish, "tokens": tokens,
            "done_at": time.monotonic()}


def _beside_streams(stream_fn, where: str, hostile_fn):
    """Run the GOOD streams; once each has produced output, run `hostile_fn`; return both."""
    events = [threading.Event() for _ in GOOD]
    with ThreadPoolExecutor(len(GOOD)) as pool:
        futures = [pool.submit(stream_fn, where, p, n, ev) for (p, n), ev in zip(GOOD, events)]
        for ev in events:
            assert ev.wait(120), "a good stream never started"
        hostile = hostile_fn()
        hostile_done = time.monotonic()
        streams = [f.result() for f in futures]
    assert hostile_done < max(s["done_at"] for s in streams), "streams ended before the cases"
    return streams, hostile


def _worker_seqs(app) -> tuple[int, int]:
    s = app["handle"].worker_stats.remote().result()
    return s["target"]["num_seqs"], s["draft"]["num_seqs"]


def _assert_no_leaked_slots(app):
    deadline = time.time() + 15
    while time.time() < deadline and _worker_seqs(app) != (0, 0):
        time.sleep(0.2)
    assert _worker_seqs(app) == (0, 0)


@pytest.fixture(scope="module")
def undisturbed(app):
    """The GOOD streams alone: what they must produce whatever else arrives."""
    events = [threading.Event() for _ in GOOD]
    with ThreadPoolExecutor(len(GOOD)) as pool:
        runs = list(pool.map(lambda a: _http_stream(app["http"], *a),
                             [(p, n, ev) for (p, n), ev in zip(GOOD, events)]))
    for run, (_, n) in zip(runs, GOOD):
        assert run["finish"] == "length" and run["tokens"] == n
    return [r["text"] for r in runs]


def _assert_whole(streams, undisturbed):
    for got, want, (_, n) in zip(streams, undisturbed, GOOD):
        assert got["finish"] == "length" and got["tokens"] == n
        assert got["text"] == want


# -- HTTP ------------------------------------------------------------------------------------------
def _post(base: str, case: Case) -> httpx.Response:
    return httpx.post(f"{base}/v1/{case.path}", content=case.raw(), timeout=120,
                      headers={"content-type": "application/json"})


def _check_refusal(case: Case, r: httpx.Response) -> str | None:
    """None if `r` is the refusal `case` expects, else what is wrong."""
    if r.status_code not in case.statuses:
        return f"status {r.status_code}: {r.text[:300]}"
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an OpenAI error body: {r.text[:300]}"
    if set(err) != {"message", "type", "param", "code"}:
        return f"error fields {sorted(err)}"
    if r.status_code == 413:          # the body limit answers before any field is read
        return None
    if err["type"] != "invalid_request_error" or case.needle not in err["message"]:
        return f"message {err['message']!r} lacks {case.needle!r}"
    if "Traceback" in err["message"] or len(err["message"]) > 600:
        return f"message too long or with internals: {err['message'][:200]!r}"
    if case.param is not None and err["param"] != case.param:
        return f"param {err['param']!r} != {case.param!r}"
    if case.code is not None and err["code"] != case.code:
        return f"code {err['code']!r} != {case.code!r}"
    return None


def test_http_hostile_cases_beside_streams(app, undisturbed):
    base = app["http"]

    def hostile():
        with ThreadPoolExecutor(8) as pool:
            refused = dict(zip((c.id for c in CASES), pool.map(lambda c: _post(base, c), CASES)))
            accepted = {name: pool.submit(httpx.post, f"{base}/v1/{path}", timeout=120,
                                          content=json.dumps(body).encode(),
                                          headers={"content-type": "application/json"})
                        for name, path, body in ACCEPTED}
            return refused, {name: f.result() for name, f in accepted.items()}

    streams, (refused, accepted) = _beside_streams(_http_stream, base, hostile)
    problems = {c.id: p for c in CASES if (p := _check_refusal(c, refused[c.id])) is not None}
    assert not problems, problems
    not_ok = {name: r.text[:200] for name, r in accepted.items() if r.status_code != 200}
    assert not not_ok, not_ok
    _assert_whole(streams, undisturbed)
    _assert_no_leaked_slots(app)


def test_http_huge_seeds_beside_streams(app, undisturbed):
    """Issue 13's request of death: seeds far above 1e13 used to fail the whole batch.
    (Needs the workers' overflow-safe seed mixing, core.sampling.stream_seed.)"""
    base = app["http"]
    seeds = [99999999999999, 2**63, 2**64 - 1, -2**63]

    def seeded():
        def post(seed):
            return httpx.post(f"{base}/v1/completions", timeout=120, json=comp(
                seed=seed, temperature=0.8, max_tokens=8, ignore_eos=True))
        with ThreadPoolExecutor(len(seeds)) as pool:
            return list(pool.map(post, seeds + seeds))

    streams, answers = _beside_streams(_http_stream, base, seeded)
    assert [r.status_code for r in answers] == [200] * len(answers), answers[0].text[:300]
    texts = [r.json()["choices"][0]["text"] for r in answers]
    assert texts[:len(seeds)] == texts[len(seeds):]       # each seed reproduces
    _assert_whole(streams, undisturbed)
    _assert_no_leaked_slots(app)


def test_http_refusals_while_streaming_requested(app):
    """stream=true changes nothing: the refusal is a status code, not an event."""
    for case in (c for c in CASES if isinstance(c.body, dict) and c.id in (
            "temperature_above_2", "seed_2_64", "tools", "prompt_beyond_context",
            "token_out_of_vocab")):
        r = httpx.post(f"{app['http']}/v1/{case.path}", json={**case.body, "stream": True},
                       timeout=60)
        assert _check_refusal(case, r) is None, (case.id, r.text[:300])


# -- gRPC ------------------------------------------------------------------------------------------
def _grpc_cases():
    from deployments.proto import specserve_pb2 as pb

    ok = {"prompt": "def f(x):", "max_tokens": 4}
    nan, inf = float("nan"), float("inf")
    cases = [
        ("max_tokens_negative", {**ok, "max_tokens": -1}, "max_tokens must be > 0"),
        ("temperature_nan", {**ok, "temperature": nan}, "finite number"),
        ("temperature_inf", {**ok, "temperature": inf}, "finite number"),
        ("temperature_7", {**ok, "temperature": 7.0}, "<= 2"),
        ("top_p_1_5", {**ok, "top_p": 1.5}, "top_p must be in"),
        ("top_p_nan", {**ok, "top_p": nan}, "finite number"),
        ("top_k_negative", {**ok, "top_k": -9}, "top_k must be"),
        ("stop_list_17", {**ok, "stop": [f"s{i}" for i in range(17)]}, "at most 16"),
        ("stop_string_300", {**ok, "stop": ["y" * 300]}, "at most 256 characters"),
        ("nul_in_prompt", {**ok, "prompt": "a\x00b"}, "control character U+0000"),
        ("escape_in_prompt", {**ok, "prompt": "\x1b[31mred"}, "control character U+001B"),
        ("control_in_slo_class", {**ok, "slo_class": "a\x02"}, "control character"),
        ("prompt_beyond_context", {**ok, "prompt": "x = 1\n" * 400}, "the context holds"),
        ("max_tokens_huge", {**ok, "max_tokens": 100_000}, "exceeds the limit"),
        ("k_override_40", {**ok, "num_speculative_tokens": 40}, "num_speculative_tokens"),
        ("empty_prompt", {**ok, "prompt": ""}, "prompt is empty"),
        ("unknown_slo_class", {**ok, "slo_class": "gold"}, "unknown SLO class"),
    ]
    return [(name, pb.GenerateRequest(**fields), needle) for name, fields, needle in cases]


def _invalid_utf8_request() -> bytes:
    """A GenerateRequest whose prompt (field 1) holds bytes that are not UTF-8."""
    from deployments.proto import specserve_pb2 as pb

    bad = b"\xff\xfe bad \xc3"
    return pb.GenerateRequest(max_tokens=4).SerializeToString() + b"\x0a" + bytes([len(bad)]) + bad


def test_grpc_hostile_cases_beside_streams(app, undisturbed):
    from deployments.proto import specserve_pb2 as pb
    from deployments.proto import specserve_pb2_grpc as pb_grpc

    cases = _grpc_cases()
    meta = (("application", APP),)

    def hostile():
        out = {}
        with grpc.insecure_channel(app["grpc"]) as channel:
            stub = pb_grpc.SpecServeStub(channel)

            def call(case):
                name, req, _ = case
                rpc = stub.Generate if len(out) % 2 else stub.GenerateStream
                try:
                    result = rpc(req, metadata=meta, timeout=120)
                    if rpc is stub.GenerateStream:
                        list(result)
                    return name, None
                except grpc.RpcError as exc:
                    return name, exc

            with ThreadPoolExecutor(6) as pool:
                out.update(pool.map(call, cases))
            raw = channel.unary_unary("/specserve.SpecServe/Generate",
                                      response_deserializer=pb.GenerateResponse.FromString)
            try:
                raw(_invalid_utf8_request(), metadata=meta, timeout=60)
                out["invalid_utf8"] = None
            except grpc.RpcError as exc:
                out["invalid_utf8"] = exc
        return out

    streams, out = _beside_streams(_grpc_stream, app["grpc"], hostile)
    problems = {}
    for name, _, needle in cases:
        exc = out[name]
        if exc is None or exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
            problems[name] = exc and (exc.code(), exc.details())
        elif needle not in exc.details() or "Traceback" in exc.details():
            problems[name] = exc.details()
    utf8 = out["invalid_utf8"]
    # Serve's gRPC proxy decodes the message before any of our code runs; it must refuse,
    # not answer, and the app must not fall over.
    if utf8 is None or utf8.code() == grpc.StatusCode.OK:
        problems["invalid_utf8"] = "answered"
    assert not problems, problems
    _assert_whole(streams, undisturbed)
    _assert_no_leaked_slots(app)


# -- DeploymentHandle ------------------------------------------------------------------------------
@pytest.mark.parametrize("args,kwargs,param", [
    (([17, True],), {"max_tokens": 4}, "prompt[1]"),
    (([[17, 18]],), {"max_tokens": 4}, "prompt"),
    (("a\ud800",), {"max_tokens": 4}, "prompt"),
    (("ok",), {"max_tokens": 4, "temperature": "0.5"}, "temperature"),
    (("ok",), {"max_tokens": 4.0}, "max_tokens"),
    (("ok",), {"max_tokens": 4, "seed": 2**64}, "seed"),
    (("ok",), {"max_tokens": 4, "logprobs": 2}, "logprobs"),
    (("ok",), {"max_tokens": 4, "num_speculative_tokens": 2.5}, "num_speculative_tokens"),
])
def test_handle_refuses_with_request_errors(app, args, kwargs, param):
    from specserve_ray.errors import RequestError

    with pytest.raises(Exception) as err:
        app["handle"].generate.remote(*args, **kwargs).result()
    exc = err.value
    cause = getattr(exc, "cause", None)
    assert isinstance(exc, RequestError) or isinstance(cause, RequestError), repr(exc)
    assert param in str(exc)


def test_handle_top_k_beyond_any_vocabulary_is_capped(app):
    r = app["handle"].generate.remote("def f(x):", max_tokens=6, ignore_eos=True,
                                      top_k=2**63, temperature=0.8, seed=5).result()
    assert len(r["token_ids"]) == 6
    _assert_no_leaked_slots(app)
