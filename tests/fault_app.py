"""A real local Serve app with fault injection allowed, for the fault tests.

One app per test module (start-up is the slow part); faults are armed at run time with
`handle.inject_fault`, counted from the worker's next step, so each test makes its own.
"""
from __future__ import annotations

import asyncio
import os
import time
from helpers import free_port  # noqa: E402

APP = "specserve-faults"
PROMPTS = ["def parse_header(line):\n    ", "import os\nimport sys\n\n\nclass ",
           "    for key, value in items:\n        if ", "# Copyright\n\"\"\"Utilities for ",
           "    def __init__(self, name, value=None):\n        self.", "return [x for x in ",
           "class Config:\n    ", "with open(path) as f:\n    "]




def start_app(transport: str = "actor", pipeline: bool = False, max_num_seqs: int = 8,
              faults: dict | None = None):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app
    from specserve_ray.config import EMBEDDED_DRAFT, EMBEDDED_TARGET

    http_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    args = {"engine": {"target": {"path": EMBEDDED_TARGET, "num_threads": 1},
                       "draft": {"path": EMBEDDED_DRAFT, "num_threads": 1},
                       "speculation": {"num_speculative_tokens": 3},
                       "limits": {"max_model_len": 512, "max_num_seqs": max_num_seqs,
                                  "max_tokens": 256}},
            "transport": transport, "pipeline": pipeline, "max_queued_requests": 128,
            "max_ongoing_requests": max_num_seqs + 128,
            "signals": {"export_metrics": False},
            "faults": {"allow_fault_injection": True, "step_timeout_s": 4.0,
                       "draft_restart_backoff_s": 0.2, **(faults or {})}}
    handle = serve.run(build_app(args), name=APP, route_prefix="/")
    return handle, f"http://127.0.0.1:{http_port}"


def stop_app() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def reference_fn():
    """Target-only greedy decoding in fp32, in this process (Hugging Face generate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specserve_ray.config import EMBEDDED_TARGET

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_TARGET, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(EMBEDDED_TARGET)
    cache: dict = {}

    def greedy(prompt: str, n: int) -> list[int]:
        if (prompt, n) not in cache:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False)
            cache[prompt, n] = out[0, len(ids):].tolist()
        return cache[prompt, n]

    return greedy


def run_batch(handle, prompts: list[str], lengths: list[int], prefix: str,
              timeout: float = 300) -> list:
    """Send greedy requests concurrently; each result is a dict or the exception raised."""
    refs = [handle.generate.remote(p, max_tokens=n, ignore_eos=True, temperature=0.0,
                                   request_id=f"{prefix}-{i}")
            for i, (p, n) in enumerate(zip(prompts, lengths))]
    out = []
    for ref in refs:
        try:
            out.append(ref.result(timeout_s=timeout))
        except Exception as exc:  # noqa: BLE001 - the tests count these
            out.append(exc)
    return out


def faults(handle) -> dict:
    return handle.stats.remote().result()["faults"]


def wait_for(predicate, timeout: float = 60.0, period: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    return predicate()


def slots(handle) -> tuple[int, int]:
    st = handle.worker_stats.remote().result()
    return st["target"]["num_seqs"], st["draft"]["num_seqs"]


def slots_back_to_zero(handle, timeout: float = 30.0) -> tuple[int, int]:
    """Releases travel with the next plan; the loop sends one on its own after the last
    request finishes. Waits for (0, 0) and returns what it saw last."""
    last = [None]

    def check():
        last[0] = slots(handle)
        return last[0] == (0, 0)

    wait_for(check, timeout)
    return last[0]


def stream_and_cancel(handle, prompt: str, max_tokens: int, cancel_after: int, rid: str):
    """Stream through the handle and stop after `cancel_after` chunks (a cancelled
    request); returns the number of chunks read or the exception."""
    async def main():
        gen = handle.options(stream=True).generate.remote(
            prompt, stream=True, max_tokens=max_tokens, ignore_eos=True, request_id=rid)
        n = 0
        async for _ in gen:
            n += 1
            if n >= cancel_after:
                gen.cancel()
                break
        return n

    return asyncio.run(main())
