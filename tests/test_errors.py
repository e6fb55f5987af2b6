"""Bad input gets a clear error, and the engine keeps serving afterwards."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from helpers import tiny_model
from specserve_ray.config import EMBEDDED_PAIR_DIR, EngineConfig, LimitsConfig, ModelConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.engine import SpecEngine
from specserve_ray.errors import RequestError
from helpers import make_engine


@pytest.fixture(scope="module")
def engine():
    return make_engine(tiny_model("llama", seed=0), tiny_model("llama", seed=1), k=3)


@pytest.mark.parametrize("field,value,match", [
    ("max_tokens", 0, "max_tokens must be > 0"),
    ("max_tokens", -5, "max_tokens must be > 0"),
    ("temperature", -0.1, "temperature must be >= 0"),
    ("temperature", float("nan"), "finite number"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("top_k", -2, "top_k must be"),
    ("stop", [""], "stop must be"),
])
def test_bad_sampling_params(field, value, match):
    with pytest.raises(ValidationError, match=match):
        SamplingParams(**{field: value})


def test_empty_prompt(engine):
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request("", SamplingParams())


def test_prompt_longer_than_context(engine):
    with pytest.raises(RequestError, match="the context holds 256"):
        engine.add_request([5] * 300, SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="exceeds the context length"):
        engine.add_request([5] * 200, SamplingParams(max_tokens=100))


def test_max_tokens_above_limit(engine):
    with pytest.raises(RequestError, match="exceeds the limit"):
        engine.add_request([5, 6], SamplingParams(max_tokens=10_000))


def test_token_ids_out_of_vocab(engine):
    with pytest.raises(RequestError, match="token ids must be integers"):
        engine.add_request([5, 96_000], SamplingParams())


def test_engine_serves_after_errors(engine):
    for bad in ([], [5] * 300):
        with pytest.raises(RequestError):
            engine.add_request(bad, SamplingParams(max_tokens=4))
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.output_ids) == 5


def test_unknown_model_path(tmp_path):
    with pytest.raises(ValidationError, match="never downloads weights"):
        ModelConfig(path=str(tmp_path / "no-such-model"))
    with pytest.raises(ValidationError, match="never downloads weights"):
        ModelConfig(path="meta-llama/Llama-3.1-8B-Instruct")


def test_bad_device():
    with pytest.raises(ValidationError, match="device must be"):
        ModelConfig(path=str(EMBEDDED_PAIR_DIR / "target"), device="tpu")


def test_draft_with_other_vocabulary_is_refused(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_PAIR_DIR / "target")
    for name, vocab in (("target", len(tokenizer)), ("draft", 1000)):
        model = tiny_model("llama", seed=0, vocab=vocab)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    cfg = EngineConfig(target=ModelConfig(path=str(tmp_path / "target")),
                       draft=ModelConfig(path=str(tmp_path / "draft")),
                       limits=LimitsConfig(max_model_len=128, max_num_seqs=2))
    with pytest.raises(ValueError, match="draft vocabulary .* differs"):
        SpecEngine.from_config(cfg)


def test_duplicate_request_id(engine):
    rid = engine.add_request([5, 6], SamplingParams(max_tokens=2), request_id="dup")
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request([5, 6], SamplingParams(max_tokens=2), request_id="dup")
    engine.abort(rid)
