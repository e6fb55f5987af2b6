"""Request validation without Ray or HTTP: the request models, the text and prompt rules, the
error shape, and the sampling values that reach the workers.

The served suite (test_hostile_inputs.py) sends the same table over HTTP; a failure here
points at the validation layer itself.
"""
from __future__ import annotations

import asyncio
import json
import pickle

import pytest
import torch

from hostile_cases import ACCEPTED, CASES, Case
from specserve_ray.api import openai as oai
from specserve_ray.api import validation as checks
from specserve_ray.api.chat import parse_messages, render_chat
from specserve_ray.sampling_params import MAX_TOP_K, SamplingParams, generator_seed
from specserve_ray.errors import RequestError, UnsupportedParameter

MODEL_CASES = [c for c in CASES if c.layer == "model"]


def _request_model(path: str):
    return oai.ChatCompletionRequest if path.startswith("chat") else oai.CompletionRequest


def _parse(path: str, body) -> oai._Common:
    data = json.loads(body) if isinstance(body, bytes) else json.loads(json.dumps(body))
    request = oai.parse_request(_request_model(path), data)
    request.sampling_params(default_max_tokens=16)
    return request


def test_table_covers_every_category():
    counts = {}
    for case in CASES:
        counts[case.category] = counts.get(case.category, 0) + 1
    assert set(counts) == {"types", "ranges", "sizes", "encodings", "unsupported", "chat",
                           "token_ids"}
    assert min(counts.values()) >= 5 and len(CASES) >= 35, counts
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.id for c in MODEL_CASES])
def test_refused_by_the_request_models(case: Case):
    with pytest.raises(RequestError) as err:
        _parse(case.path, case.body)
    exc = err.value
    assert case.needle in str(exc)
    if case.param is not None:
        assert exc.param == case.param, str(exc)
    if case.code is not None:
        assert exc.code == case.code, str(exc)


@pytest.mark.parametrize("case_id,path,body", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_at_the_edge(case_id, path, body):
    _parse(path, body)


ADMISSION_CASES = [c for c in CASES if c.layer == "admission"]


@pytest.fixture(scope="module")
def admission():
    """The front door's checks and the scheduler, without a step loop or Ray: what needs
    the configured limits, the vocabulary or the context length."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from specserve_ray.api.front import FrontDoor
    from specserve_ray.config import EMBEDDED_TARGET, LimitsConfig
    from specserve_ray.front_config import FrontDoorConfig
    from specserve_ray.scheduler import Scheduler

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_TARGET, local_files_only=True)
    limits = LimitsConfig(max_model_len=256, max_num_seqs=8, max_tokens=200)  # as served
    scheduler = Scheduler(tokenizer, 4096, True, limits)
    front = FrontDoor(SimpleNamespace(engine=scheduler, max_queued=0), tokenizer,
                      FrontDoorConfig(), max_queued_requests=16)
    yield front, scheduler
    front.close()


@pytest.mark.parametrize("case", ADMISSION_CASES, ids=[c.id for c in ADMISSION_CASES])
def test_refused_at_admission(case: Case, admission):
    """Well-formed at the door; the front door's limits or the scheduler refuse it."""
    front, scheduler = admission
    request = _parse(case.path, case.body)
    params = request.sampling_params(16)
    with pytest.raises(RequestError) as err:
        front.check_params(params)
        prompt_ids = asyncio.run(front.encode(request.prompt_input()))
        scheduler.add_request(prompt_ids, params)
    assert case.needle in str(err.value)
    assert (err.value.param, err.value.code) == (case.param, case.code)
    assert not scheduler.waiting


# -- the values the workers get --------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 - 1, 2**63, -2**63, 2**64 - 1, 99999999999999])
def test_seed_reduced_into_the_generator_range(seed):
    sampling = SamplingParams(seed=seed, temperature=0.5).seq_sampling(vocab_size=4096)
    assert 0 <= sampling.seed < 2**64
    assert sampling.seed == generator_seed(seed) == seed % 2**64
    torch.Generator().manual_seed(sampling.seed)   # the range torch takes


def test_seed_reduction_is_deterministic_and_keeps_distinct_seeds_apart():
    assert generator_seed(-1) == generator_seed(2**64 - 1)   # one 64-bit pattern
    assert len({generator_seed(s) for s in range(-50, 50)}) == 100


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**30])
def test_seed_out_of_range_refused(seed):
    with pytest.raises(RequestError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
        checks.sampling_params(seed=seed)


@pytest.mark.parametrize("top_k,vocab,expected", [
    (0, 4096, 0), (-1, 4096, 0), (50, 4096, 50), (4096, 4096, 4096), (5000, 4096, 4096),
    (2**63, 4096, 4096), (2**200, 4096, 4096), (2**63, None, MAX_TOP_K)])
def test_top_k_capped_at_the_vocabulary(top_k, vocab, expected):
    sampling = SamplingParams(top_k=top_k).seq_sampling(vocab)
    assert sampling.top_k == expected
    torch.tensor([sampling.top_k], dtype=torch.long)   # fits the workers' tensor


# -- Python callers (DeploymentHandle, gRPC) get the same checks -----------------------------------
@pytest.mark.parametrize("kwargs,param,code", [
    ({"temperature": "0.5"}, "temperature", "invalid_type"),
    ({"max_tokens": 2.0}, "max_tokens", "invalid_type"),
    ({"ignore_eos": "yes"}, "ignore_eos", "invalid_type"),
    ({"seed": True}, "seed", "invalid_type"),
    ({"temperature": float("nan")}, "temperature", "invalid_value"),
    ({"top_p": float("inf")}, "top_p", "invalid_value"),
    ({"temperature": 3.0}, "temperature", "invalid_value"),
    ({"seed": 2**64}, "seed", "invalid_value"),
    ({"stop": ["ok", "\ud800"]}, "stop[1]", "invalid_value"),
    ({"stop": 5}, "stop", "invalid_type"),
    ({"logprobs": 3}, "logprobs", "unknown_parameter"),
])
def test_sampling_keywords_refused_as_request_errors(kwargs, param, code):
    with pytest.raises(RequestError) as err:
        checks.sampling_params(**kwargs)
    assert (err.value.param, err.value.code) == (param, code), str(err.value)


@pytest.mark.parametrize("prompt,k,slo,param", [
    ([True, 5], None, None, "prompt[0]"),
    ([[1, 2]], None, None, "prompt"),
    ("a\ud800", None, None, "prompt"),
    ("", None, None, "prompt"),
    (None, None, None, "prompt"),
    ("ok", 2.5, None, "num_speculative_tokens"),
    ("ok", 17, None, "num_speculative_tokens"),
    ("ok", True, None, "num_speculative_tokens"),
    ("ok", None, 7, "slo_class"),
])
def test_handle_call_checks(prompt, k, slo, param):
    with pytest.raises(RequestError) as err:
        checks.handle_call(prompt, k, slo, {"max_tokens": 4})
    assert err.value.param == param


def test_handle_call_accepts_and_normalises():
    prompt, params, k, slo = checks.handle_call((5, 6), 3, "batch", {"max_tokens": 4,
                                                                      "seed": 2**64 - 1})
    assert prompt == [5, 6] and k == 3 and slo == "batch"
    assert params.max_tokens == 4 and params.seed == 2**64 - 1


# -- error shape ----------------------------------------------------------------------------------
def test_error_body_has_openai_shape():
    exc = UnsupportedParameter("tools", "tools are not supported")
    body = oai.error_body(str(exc), 400, **oai.error_fields(exc))
    assert body == {"error": {"message": "tools are not supported",
                              "type": "invalid_request_error", "param": "tools",
                              "code": "unsupported_parameter"}}
    plain = oai.error_body("boom", 500, **oai.error_fields(RuntimeError("x")))
    assert plain["error"]["param"] is None and plain["error"]["type"] == "server_error"


def test_request_errors_keep_param_and_code_across_pickling():
    """Ray pickles exceptions raised in replicas back to handle callers."""
    for exc in (RequestError("bad", "temperature", "invalid_value"),
                UnsupportedParameter("tools", "no tools")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc)
        assert (str(back), back.param, back.code) == (str(exc), exc.param, exc.code)


def test_fastapi_style_errors_drop_the_body_prefix():
    """FastAPI reports body errors with loc ("body", ...); param is the client's name."""
    errors = [{"type": "bool_type", "loc": ("body", "stream"), "msg": "Input should be a valid "
               "boolean", "input": "yes"},
              {"type": "extra_forbidden", "loc": ("body", "messages", 0, "x"), "msg": "",
               "input": 1}]
    exc = checks.request_error(errors)
    assert exc.param == "stream" and exc.code == "invalid_type"
    assert "Unrecognized request argument supplied: messages[0].x" in str(exc)


def test_many_findings_are_summarised():
    with pytest.raises(RequestError) as err:
        oai.parse_request(oai.CompletionRequest, {"prompt": "x", "a": 1, "b": 2, "c": 3, "d": 4,
                                                  "e": 5})
    assert "and 2 more" in str(err.value) and err.value.code == "unknown_parameter"


# -- chat ----------------------------------------------------------------------------------
def test_chat_messages_flatten_text_parts():
    turns = parse_messages([{"role": "system", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "a"},
                                                         {"type": "text", "text": "b"}]},
                            {"role": "assistant", "content": "ok", "tool_calls": []}])
    assert turns == [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "ab"}, {"role": "assistant", "content": "ok"}]


class _Tokenizer:
    chat_template = None

    def apply_chat_template(self, messages, chat_template, tokenize, add_generation_prompt):
        from jinja2 import Environment

        env = Environment()
        env.globals["raise_exception"] = _raise
        return env.from_string(chat_template).render(messages=messages,
                                                     add_generation_prompt=True)


def _raise(message):
    from jinja2 import TemplateError

    raise TemplateError(message)


def test_chat_template_refusal_is_a_request_error():
    strict = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
              "{{ raise_exception('system message must come first') }}{% endif %}"
              "{{ m['content'] }}{% endfor %}")
    turns = parse_messages([{"role": "user", "content": "hi"},
                            {"role": "system", "content": "late"}])
    with pytest.raises(RequestError, match="system message must come first") as err:
        render_chat(_Tokenizer(), turns, strict)
    assert err.value.param == "messages"
    assert render_chat(_Tokenizer(), turns[:1], None).endswith("<|assistant|>\n")
