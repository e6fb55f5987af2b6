"""Prompt lookup served for real: a Ray Serve app with `drafter: ngram` and no draft model.

The router's transport calls the target actor alone (`step_without_draft`), which verifies
the scheduler's n-gram proposals. Greedy output over HTTP (official `openai` client)
equals target-only Hugging Face greedy; /v1/stats counts n-gram drafts and acceptances;
bad drafter values are clear 400s.
"""
from __future__ import annotations

import os

import httpx
import pytest

from helpers import free_port as _free_port
from test_deployment import MODEL, _embedded

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_name": MODEL,
            "engine": {"target": {"num_threads": 2} | _embedded("target"), "draft": None,
                       "speculation": {"num_speculative_tokens": 4, "drafter": "ngram",
                                       "prompt_lookup_min": 1},
                       "limits": {"max_model_len": 512, "max_num_seqs": 4, "max_tokens": 128}},
            "signals": {"export_metrics": False}}
    serve.run(build_app(args), name="ngram", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_ngram_without_draft_model_over_http_is_lossless(app):
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specserve_ray.config import EMBEDDED_TARGET

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_TARGET, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(EMBEDDED_TARGET)
    prompt = "    for key, value in items:\n        if key in seen:\n            "
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=48, min_new_tokens=48,
                              do_sample=False)[0, len(ids):].tolist()
    client = OpenAI(base_url=app + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(want)
    stats = httpx.get(app + "/v1/stats", timeout=30).json()["speculation"]
    ngram = stats["per_drafter"]["ngram"]
    assert ngram["num_draft_tokens"] > 0 and ngram["num_accepted_tokens"] > 0
    assert "model" not in stats["per_drafter"]


@pytest.mark.parametrize("drafter,message", [
    ("model", "drafter 'model' needs a draft model"),
    ("suffix", "drafter")])
def test_bad_drafter_is_a_400(app, drafter, message):
    r = httpx.post(app + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "x = 1\n", "max_tokens": 4, "drafter": drafter})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
