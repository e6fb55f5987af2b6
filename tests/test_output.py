"""Request output: incremental detokenizing equals a full decode; stop strings are exact
(streamed or not, whatever step boundaries), token counts match the text."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from specserve_ray.config import EMBEDDED_TARGET
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.output import TextStream, commit_tokens
from specserve_ray.request import Request


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_TARGET, local_files_only=True)


def _steps(rng: random.Random, ids: list[int]) -> list[list[int]]:
    """Cut a token list into random step-sized pieces (1-5 tokens, like speculation)."""
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 5)
        out.append(ids[i:i + n])
        i += n
    return out


def _run(tokenizer, ids: list[int], stop=(), max_tokens=10_000, seed=0):
    """Feed `ids` through commit_tokens in random steps; return (streamed text, request)."""
    req = Request("r", [5], SamplingParams(max_tokens=max_tokens, stop=stop, ignore_eos=True))
    streamed = []
    for piece in _steps(random.Random(seed), ids):
        commit_tokens(req, piece, tokenizer.eos_token_id, tokenizer)
        streamed.append(req.text.take(req.finished))
        if req.finished:
            break
    if not req.finished:
        req.text.add(req.output_ids, final=True)
        streamed.append(req.text.take(True))
    return "".join(streamed), req


def _sample_ids(tokenizer, rng: random.Random, n: int) -> list[int]:
    text = ("def parse(line):\n    return line.split(',')  # naïve — ünïcode ✓\n"
            "class Foo:\n    pass\n") * 4
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = rng.randrange(0, len(ids) - n)
    return ids[start:start + n]


@pytest.mark.parametrize("seed", range(20))
def test_incremental_text_equals_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = (_sample_ids(tokenizer, rng, 40) if seed % 2 else
           [rng.randrange(tokenizer.vocab_size) for _ in range(40)])  # raw bytes too
    streamed, req = _run(tokenizer, ids, seed=seed)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(60))
def test_stop_strings_exact_at_random_positions(tokenizer, seed):
    """A stop string cut from a random place of the full text: the output ends right
    before its first occurrence, streamed equals the final text, and the kept tokens
    decode to at least that text and their last token is needed for it."""
    rng = random.Random(1000 + seed)
    ids = _sample_ids(tokenizer, rng, 48)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    start = rng.randrange(0, len(full) - 1)
    stop = full[start:start + rng.randint(1, 6)]
    expected = full[:full.find(stop)]
    streamed, req = _run(tokenizer, ids, stop=(stop, "\x00never"), seed=seed)
    assert req.finish_reason == "stop"
    assert req.text.text == expected
    assert streamed == expected        # nothing past the stop was ever shown
    kept = req.output_ids
    assert tokenizer.decode(kept, skip_special_tokens=True).startswith(expected)
    if kept:
        # One token fewer would not reach the stop position: no token past it is counted.
        shorter = tokenizer.decode(kept[:-1], skip_special_tokens=True).rstrip("\ufffd")
        assert len(shorter) < len(expected)


def test_stop_at_start_keeps_no_tokens(tokenizer):
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    _, req = _run(tokenizer, ids, stop=("hel",))
    assert req.text.text == "" and req.output_ids == [] and req.finish_reason == "stop"


def test_holdback_then_release_when_not_a_stop(tokenizer):
    """Text that could start a stop string is held back, then shown once it cannot."""
    stream = TextStream(tokenizer, ("abc",))
    ids = tokenizer("xab", add_special_tokens=False)["input_ids"]
    assert not stream.add(ids, final=False)
    assert stream.text == "xab" and stream.take(False) == "x"     # "ab" may become "abc"
    ids += tokenizer("d", add_special_tokens=False)["input_ids"]
    assert not stream.add(ids, final=False)
    assert stream.take(False) == "abd"


def test_max_tokens_and_eos(tokenizer):
    req = Request("r", [5], SamplingParams(max_tokens=3))
    kept = commit_tokens(req, [10, 11, 12, 13, 14], tokenizer.eos_token_id, tokenizer)
    assert kept == 3 and req.output_ids == [10, 11, 12] and req.finish_reason == "length"
    req = Request("r", [5], SamplingParams(max_tokens=10))
    kept = commit_tokens(req, [10, tokenizer.eos_token_id, 12], tokenizer.eos_token_id, tokenizer)
    assert kept == 2 and req.finish_reason == "stop"
