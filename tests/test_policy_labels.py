"""The sweep's policy labels (a policy with live knobs, run as a policy of its own) and
--only-loads (some points of a rate list, on the request sets of the full list)."""
from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import pytest

from specserve_ray.bench import workloads as wl
from specserve_ray.bench.args import add_arguments, check_args
from specserve_ray.bench.policy_labels import parse_label, switch_config
from specserve_ray.bench.sweep_plan import estimate_seconds

DEFAULTS = {"yield_to_prompts": False, "prompt_lookup_min": 1, "prompt_lookup_max": 4}


def test_parse_label():
    assert parse_label("specserve") == ("specserve", {})
    assert parse_label("Static:3") == ("static:3", {})
    assert parse_label("specserve@yield_to_prompts=true") == (
        "specserve", {"yield_to_prompts": True})
    assert parse_label("static:3@prompt_lookup_min=1,prompt_lookup_max=6") == (
        "static:3", {"prompt_lookup_min": 1, "prompt_lookup_max": 6})
    for bad, says in (("specserve@", "nothing after"), ("specserve@yield_to_prompts", "KEY=VALUE"),
                      ("specserve@policy=none", "not a live speculation knob"),
                      ("specserve@drafter=ngram", "not a live speculation knob"),
                      ("specserve@yield_to_prompts=true,yield_to_prompts=false", "twice")):
        with pytest.raises(ValueError, match=says):
            parse_label(bad)


def test_switch_config_resets_what_another_label_set():
    labels = ["static:1", "specserve", "specserve@yield_to_prompts=true"]
    assert switch_config("specserve@yield_to_prompts=true", labels, 5, DEFAULTS) == {
        "policy": "specserve", "num_speculative_tokens": 5, "yield_to_prompts": True}
    # the plain policies switch it back, so a variant never leaks into the next run
    assert switch_config("specserve", labels, 5, DEFAULTS) == {
        "policy": "specserve", "num_speculative_tokens": 5, "yield_to_prompts": False}
    assert switch_config("none", labels, 5, DEFAULTS)["yield_to_prompts"] is False
    # without variants: exactly the policy switch it always was
    assert switch_config("static:3", ["static:3", "none"], 5, DEFAULTS) == {
        "policy": "static:3", "num_speculative_tokens": 5}


def test_the_switch_sends_the_labels_config_and_waits_for_its_policy(monkeypatch):
    from specserve_ray.bench import control
    from specserve_ray.bench.sweep import Sweep

    sent, waited = [], []

    class Switcher:
        async def apply(self, cfg):
            sent.append(cfg)

    async def wait_for_policy(url, policy, timeout_s):
        waited.append(policy)

    monkeypatch.setattr(control, "wait_for_policy", wait_for_policy)
    args = SimpleNamespace(policies=["specserve", "specserve@yield_to_prompts=true"], max_k=4,
                           switch_timeout=1.0)
    sweep = Sweep(args, client=None, prompts=None, traces={})
    asyncio.run(sweep.switch("http://x", Switcher(), "specserve@yield_to_prompts=true"))
    asyncio.run(sweep.switch("http://x", Switcher(), "specserve"))
    assert [c["yield_to_prompts"] for c in sent] == [True, False]
    assert waited == ["specserve", "specserve"]


def _args(tmp_path, *argv):
    (tmp_path / wl.TRACE_FILES["code"]).write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"{i * 0.5},{300 + i},{10 + i}\n" for i in range(50)))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--workloads", "code", "--regime", "fp32", "--trace-dir",
                         str(tmp_path), *argv])
    check_args(args)
    return args


def test_only_loads_keeps_the_full_lists_indices(tmp_path):
    full = _args(tmp_path, "--loads", "0.3,0.5,0.7,1.0")
    assert full.run_levels == [0, 1, 2, 3]
    some = _args(tmp_path, "--loads", "0.3,0.5,0.7,1.0", "--only-loads", "0.7,1")
    assert some.run_levels == [2, 3]           # the request sets of x0.7 and x1 in the full list
    assert estimate_seconds(some) < estimate_seconds(full)
    with pytest.raises(SystemExit, match="not in the sweep's list"):
        _args(tmp_path, "--loads", "0.3,0.5", "--only-loads", "0.4")


def test_variant_labels_are_checked_up_front(tmp_path):
    args = _args(tmp_path, "--policies", "static:1", "specserve",
                 "specserve@yield_to_prompts=true")
    assert args.policies[-1] == "specserve@yield_to_prompts=true"
    with pytest.raises(SystemExit, match="prompt_lookup_min"):
        _args(tmp_path, "--policies", "specserve@prompt_lookup_min=0")
    with pytest.raises(SystemExit, match="dashboard-url"):
        _args(tmp_path, "--url", "http://127.0.0.1:1", "--policies",
              "specserve@yield_to_prompts=true")
