"""The edit prompt set: a held-out function, a blank line, its first line again."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from specserve_ray.bench.prompt_sets import edit_cases, edit_prompts, prompt_set
from specserve_ray.config import EMBEDDED_PAIR_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_PAIR_DIR / "target")


def test_edit_case_is_the_function_then_its_first_line_and_the_body_follows(tokenizer):
    cases = edit_cases(tokenizer, 4)
    assert len(cases) == 4
    for ids, body in cases:
        text = tokenizer.decode(ids)
        first_copy, _, repeated = text.rpartition("\n\n")
        # What a copying model writes next completes the first copy exactly.
        assert first_copy.startswith(repeated) and (repeated + body).rstrip("\n") == first_copy
        assert body.startswith("\n")


def test_edit_prompt_does_not_end_in_a_bare_newline(tokenizer):
    # BPE merges a newline with the next line's indentation; a prompt ending in a lone
    # newline token would tell the model the body is not indented (it then never copies).
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for ids in edit_prompts(tokenizer, 4):
        assert ids[-len(newline):] != newline
        assert not tokenizer.decode(ids[-1:]).endswith("\n")


def test_prompt_set_names(tokenizer):
    assert len(prompt_set("edit", tokenizer, 2, 64)) == 2
    assert all(len(p) == 64 for p in prompt_set("completion", tokenizer, 2, 64))
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompt_set("chat", tokenizer, 1, 64)
