"""The speculation policy wired into the engine: per-request k chosen every step.

Lossless whatever the policy chooses (greedy output equals target-only greedy output),
switchable on a live engine, and fed by a bounded start-up profile cached on disk.
"""
from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from helpers import hf_greedy, tiny_model
from helpers import GREEDY, make_engine, perturbed, random_prompts
from specserve_ray.config import SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.models.runner import ModelRunner
from specserve_ray.policy import CostModel, profile_grid
from specserve_ray.policy.profile import cache_dir, load_or_profile, profile_runner

# Verification dominated by a fixed cost and drafting cheap: speculation pays, so the
# adaptive policies actually draft (and both acceptance paths run).
SPEC_FRIENDLY = CostModel((0.01, 1e-4, 1e-5, 1e-8), (1e-4, 1e-4, 1e-5, 1e-9))


@pytest.fixture(scope="module")
def prompts_and_refs(pair):
    target, _ = pair
    prompts = random_prompts(6, seed=42)
    return prompts, [hf_greedy(target, p, 24) for p in prompts]


def policy_engine(target, draft, policy: str, k: int = 4, max_seqs: int = 8):
    engine = make_engine(target, draft, k=k, max_seqs=max_seqs)
    engine.cost_model = SPEC_FRIENDLY
    engine.speculation = SpeculationConfig(num_speculative_tokens=k, policy=policy)
    return engine


def test_default_policy_is_static_k():
    spec = SpeculationConfig()
    assert spec.policy == "static" and spec.static_k == spec.num_speculative_tokens
    assert SpeculationConfig(policy="static:3").static_k == 3
    assert SpeculationConfig(policy="specserve").static_k is None
    assert SpeculationConfig(policy="SpecServe").needs_cost_model
    for bad in ("bogus", "static:x", "static:99", "threshold:abc", "specserve:2"):
        with pytest.raises(ValidationError, match="policy|static|threshold"):
            SpeculationConfig(policy=bad)


@pytest.mark.parametrize("policy", ["specserve", "smartspec", "threshold", "none"])
def test_policy_greedy_equals_target_only(pair, prompts_and_refs, policy):
    target, draft = pair
    prompts, refs = prompts_and_refs
    engine = policy_engine(target, draft, policy)
    outs = engine.generate(prompts, GREEDY)
    assert [o.output_ids for o in outs] == refs, policy
    assert engine.chooser.policy is not None and engine.chooser.policy.name == policy
    if policy == "none":
        assert engine.totals.num_draft_tokens == 0 and engine.chooser.mean_chosen_k == 0.0
    else:
        assert engine.totals.num_draft_tokens > 0, policy
        assert 0.0 < engine.chooser.mean_chosen_k <= 4.0
    if policy in ("specserve", "threshold"):
        # Per-request confidence EMAs were updated from the draft's confidences.
        assert engine.totals.num_accepted_tokens > 0


def test_policy_respects_per_request_k_and_max_tokens(pair):
    target, draft = pair
    engine = policy_engine(target, draft, "threshold", k=6)
    prompts = random_prompts(3, seed=5)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (1, 7, 24)]
    outs = engine.generate(prompts, params, num_speculative_tokens=[None, 0, 2])
    for p, sp, o in zip(prompts, params, outs):
        assert o.output_ids == hf_greedy(target, p, sp.max_tokens)
    assert outs[1].spec.num_draft_tokens == 0
    assert outs[2].spec.num_draft_tokens <= 2 * outs[2].spec.num_steps


def test_policy_switch_on_a_live_engine(pair):
    target, draft = pair
    engine = make_engine(target, draft, k=4)
    assert engine.chooser.policy is None              # static: the fast path
    prompts = random_prompts(4, seed=9)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {rid: [] for rid in ids}

    def step():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)

    for _ in range(3):
        step()
    # An adaptive policy without a cost model is refused and the old config stays.
    with pytest.raises(ValueError, match="cost model"):
        engine.speculation = SpeculationConfig(policy="specserve")
    assert engine.speculation.policy == "static" and engine.chooser.policy is None
    engine.cost_model = CostModel.from_dict(SPEC_FRIENDLY.to_dict())
    learned = engine.chooser.learned
    switches = ["specserve", "none", "smartspec", "static:2", "threshold", "static"] * 20
    for policy in switches:
        if not engine.has_unfinished():
            break
        engine.speculation = SpeculationConfig(num_speculative_tokens=4, policy=policy)
        assert (engine.chooser.policy is None) == policy.startswith("static")
        step()
        if policy == "none":
            assert engine.chooser.mean_chosen_k == 0.0
        if policy == "static:2" and engine.chooser.chosen_k_rows:
            assert engine.chooser.mean_chosen_k <= 2.0
        # What the engine learned (acceptance, calibration, cost corrections) is the
        # engine's, not the policy instance's: every switch keeps it.
        assert engine.chooser.learned is learned
        assert engine.chooser.policy is None or engine.chooser.policy.learned is learned
    while engine.has_unfinished():
        step()
    for rid, p in zip(ids, prompts):
        assert tokens[rid] == hf_greedy(target, p, 30)
    assert engine.totals.num_draft_tokens > 0
    assert learned.acceptance_of().evidence > 0 and learned.cost is engine.cost_model


def test_profile_runner_budget_and_fit(pair):
    target, _ = pair
    runner = ModelRunner(target, 4, 128, "target")
    runner.add("live")                                  # a live sequence keeps its slot
    runner.forward(["live"], [[5, 6, 7]])
    grid = profile_grid(8, 5, [8.0, 48.0, 200.0])       # batch 8 and context 200 don't fit
    start = time.perf_counter()
    samples = profile_runner(runner, "verify", grid, repeats=3, time_budget_s=3.0)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0 + 1.0                          # one point past the deadline at most
    assert samples and all(s.batch <= 3 and s.context <= 48 for s in samples)
    assert runner.num_seqs() == 1 and runner.tokens("live") == [5, 6, 7]
    draft = profile_runner(runner, "draft", profile_grid(2, 5, [8.0, 48.0], "draft"),
                           repeats=3, time_budget_s=2.0)
    assert draft and all(s.kind == "draft" for s in draft)
    # Fit on every other sample, predict the rest: loose bound (2 shared CPU cores).
    model = CostModel().fit(samples[::2] + draft[::2])
    held_out = samples[1::2] + draft[1::2]
    assert model.heldout_error(held_out) < 0.6
    # A tiny budget stops early but still returns what it measured.
    start = time.perf_counter()
    # (0.005 s: after issue 9 the whole fitting grid of this tiny model runs in ~0.04 s.)
    few = profile_runner(runner, "verify", grid, repeats=3, time_budget_s=0.005)
    assert time.perf_counter() - start < 1.0 and len(few) < len(samples)
    assert runner.num_seqs() == 1


def test_cost_model_disk_cache_round_trips(tmp_path, monkeypatch):
    calls = []

    def fit():
        calls.append(1)
        return CostModel((0.01, 0.002, 0.0003, 1e-6), (0.001, 0.002, 0.0001, 1e-7))

    key = CostModel.key("/m/target|/m/draft", "float32", "cpu", {"torch": "x"})
    first = load_or_profile(tmp_path, key, fit)
    second = load_or_profile(tmp_path, key, fit)
    assert len(calls) == 1
    assert second.to_dict() == first.to_dict()
    assert json.loads((tmp_path / f"cost-{key}.json").read_text()) == first.to_dict()
    # A corrupt file is re-profiled and rewritten.
    (tmp_path / f"cost-{key}.json").write_text("{not json")
    load_or_profile(tmp_path, key, fit)
    assert len(calls) == 2
    monkeypatch.setenv("SPECSERVE_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    load_or_profile(None, key, fit)
    assert (tmp_path / "env" / f"cost-{key}.json").is_file()


def test_from_config_profiles_once_and_caches(tmp_path):
    from specserve_ray.config import EngineConfig
    from specserve_ray.engine import SpecEngine

    cfg = EngineConfig(speculation={"num_speculative_tokens": 3, "policy": "specserve",
                                    "profile_budget_s": 1.0},
                       limits={"max_model_len": 128, "max_num_seqs": 2})
    start = time.perf_counter()
    engine = SpecEngine.from_config(cfg, cache_dir=str(tmp_path))
    assert engine.chooser.policy.name == "specserve" and engine.cost_model.has_draft
    assert list(tmp_path.glob("cost-*.json"))
    out = engine.generate(["def f(x):"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(out.output_ids) == 8
    first = time.perf_counter() - start
    again = SpecEngine.from_config(cfg, cache_dir=str(tmp_path))   # from the cache
    # Same fitted laws (the live engine's online correction only moved its own scale).
    assert again.cost_model.verify_coef == engine.cost_model.verify_coef
    assert again.cost_model.draft_coef == engine.cost_model.draft_coef
    assert first < 30
    # What serving taught is saved with the profile (every persist_every decode steps;
    # here by hand) and a restart resumes it: acceptance, calibration, goodput, the
    # cost model's scale and step overhead.
    learned = engine.chooser.learned
    assert learned.acceptance_of().evidence > 0 and engine.cost_model.step_overhead > 0
    engine.chooser.persist_learned()
    resumed = SpecEngine.from_config(cfg, cache_dir=str(tmp_path))
    assert resumed.chooser.learned.prior() == pytest.approx(learned.prior(), abs=1e-3)
    assert resumed.chooser.learned.goodput.count == learned.goodput.count
    assert resumed.cost_model.step_overhead == pytest.approx(engine.cost_model.step_overhead)
    assert resumed.cost_model.scale == pytest.approx(engine.cost_model.scale)
    assert resumed.chooser.learned.calibration_of().table() == pytest.approx(
        learned.calibration_of().table(), abs=1e-3)
