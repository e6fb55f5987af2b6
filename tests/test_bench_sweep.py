"""The sweep's pure parts: workloads from a small synthetic trace, arrivals, the SLO rule,
paired CIs, the max-rate-at-90% interpolation and its CI, deciding rates, the JSON shape
of the conclusions, checkpoint and resume; and (slow) the whole command against a real
local Serve app. The load benchmark's summary: test_bench_load.py; the bench extra's
dependencies: test_bench_extra.py."""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from specserve_ray.bench import aggregate as agg
from specserve_ray.bench import stats as st
from specserve_ray.bench import trace as tr
from specserve_ray.bench import workloads as wl
from specserve_ray.bench.loadgen import RequestRecord

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def trace_dir(tmp_path):
    """A synthetic 'code' trace (long contexts, short outputs) and 'conv' trace."""
    rng = np.random.default_rng(0)
    for name, ctx, gen in (("code", 1500, 13), ("conv", 1000, 130)):
        lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
        t = 0.0
        for _ in range(400):
            t += float(rng.exponential(0.5))
            lines.append(f"{t:.4f},{int(rng.lognormal(np.log(ctx), 0.6))},"
                         f"{max(1, int(rng.lognormal(np.log(gen), 0.8)))}")
        (tmp_path / wl.TRACE_FILES[name]).write_text("\n".join(lines) + "\n")
    return tmp_path


def _rows(trace_dir, name):
    return tr.load_trace(wl.find_trace(name, str(trace_dir)))


# -- workloads ------------------------------------------------------------------------------
def test_parse_workload():
    assert wl.parse_workload("code") == (wl.WORKLOADS["code"], "poisson")
    assert wl.parse_workload("conv-decode:gamma") == (wl.WORKLOADS["conv-decode"], "gamma")
    assert wl.parse_workload("code-replay")[1] == "replay"
    for bad in ("nope", "code:uniform", "code-replay:poisson"):
        with pytest.raises(ValueError):
            wl.parse_workload(bad)


def test_find_trace_order(trace_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("empty")
    env = {"SPECSERVE_SHARED": str(trace_dir.parent)}
    (trace_dir.parent / "traces").mkdir(exist_ok=True)
    with pytest.raises(tr.TraceError, match="not found"):
        wl.find_trace("code", str(other), env={})
    assert wl.find_trace("code", str(trace_dir), env=env).startswith(str(trace_dir))
    # An explicit folder is the only place looked at; else $SPECSERVE_SHARED/traces.
    with pytest.raises(tr.TraceError, match="not found"):
        wl.find_trace("code", str(other), env={"SPECSERVE_SHARED": str(trace_dir.parent)})
    (trace_dir.parent / "traces" / wl.TRACE_FILES["code"]).write_text(
        (trace_dir / wl.TRACE_FILES["code"]).read_text())
    assert wl.find_trace("code", None, env=env, cwd=str(other)).startswith(
        str(trace_dir.parent / "traces"))


@pytest.mark.parametrize("name", ["code", "conv-decode", "code-long"])
def test_lengths_fit_the_context_and_the_workload(trace_dir, name):
    spec, arrival = wl.parse_workload(name)
    rows = _rows(trace_dir, spec.trace)
    reqs = wl.make_requests(spec, arrival, rows, rate=2.0, count=300, seed=1, max_model_len=1024)
    ins = np.array([r.input_tokens for r in reqs])
    outs = np.array([r.output_tokens for r in reqs])
    assert len(reqs) == 300 and np.all(ins + outs <= 1024) and np.all(ins >= 1)
    assert outs.min() >= spec.min_output and outs.max() <= spec.max_output
    if name == "conv-decode":      # decode-heavy: every output 128-256 tokens
        assert outs.min() >= 128 and outs.max() <= 256
    if name == "code-long":        # the load bench's ~640-token median prompt
        assert 560 <= np.median(ins) <= 720
    if name == "code":             # the trace's p99 context maps onto 1024 - 128
        assert np.percentile(ins, 99) <= 896 and ins.max() <= 896 and np.median(ins) > 200
    # Deterministic per seed (identical request sets for every policy), different per seed.
    again = wl.make_requests(spec, arrival, rows, 2.0, 300, 1, 1024)
    assert again == reqs
    assert wl.make_requests(spec, arrival, rows, 2.0, 300, 2, 1024) != reqs


def test_arrivals_poisson_and_gamma_rates(trace_dir):
    spec = wl.WORKLOADS["code"]
    rows = _rows(trace_dir, "code")
    for arrival, cv in (("poisson", 1.0), ("gamma", 1 / np.sqrt(0.5))):
        reqs = wl.make_requests(spec, arrival, rows, 4.0, 4000, 3, 1024, burstiness=0.5)
        gaps = np.diff([r.arrival_s for r in reqs])
        assert reqs[0].arrival_s == 0.0 and np.all(gaps >= 0)
        assert 1 / gaps.mean() == pytest.approx(4.0, rel=0.06)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_replay_keeps_the_trace_pattern_at_the_rate(trace_dir):
    rows = _rows(trace_dir, "code")
    reqs = wl.make_requests(wl.WORKLOADS["code-replay"], "replay", rows, 3.0, 100, 0, 1024)
    assert tr.mean_rate(reqs) == pytest.approx(3.0)
    assert wl.request_count(0.5, 60, 60, 400) == 60 and wl.request_count(3, 60, 60, 400) == 180
    assert wl.request_count(30, 60, 60, 400) == 400


# -- statistics --------------------------------------------------------------------------------
def test_paired_difference_ci():
    rng = np.random.default_rng(0)
    base = rng.normal(100, 30, 400)            # per-request noise shared by both policies
    a, b = base - 5 + rng.normal(0, 1, 400), base   # a is 5 ms faster on every request
    d = st.paired_difference(a, b)
    assert d["mean_diff"] == pytest.approx(-5, abs=0.3) and d["significant"]
    lo, hi = d["ci95"]
    assert lo < -5 < hi and hi - lo < 1.0      # pairing removes the shared noise
    same = st.paired_difference(base + rng.normal(0, 1, 400), base)
    assert same["ci95"][0] < 0 < same["ci95"][1] and not same["significant"]
    nan = st.paired_difference(np.array([1.0, np.nan, 3.0]), np.array([0.0, 1.0, np.nan]))
    assert nan["n_pairs"] == 1 and nan["mean_diff"] == 1.0
    with pytest.raises(ValueError):
        st.paired_difference(np.zeros(2), np.zeros(3))


def test_ci_over_repetitions_widens_with_pass_to_pass_spread():
    rng = np.random.default_rng(1)
    # Two passes of 60 requests that disagree (a queue formed in one): 0.95 vs 0.55 met.
    passes = [(rng.random(60) < 0.95).astype(float), (rng.random(60) < 0.55).astype(float)]
    pooled = st.bootstrap_mean_ci(np.concatenate(passes))
    clustered = st.repetitions_mean_ci(passes)
    assert clustered[1] - clustered[0] > 1.5 * (pooled[1] - pooled[0])
    # Passes that agree keep about the requests' CI; one pass is exactly it.
    alike = [(rng.random(60) < 0.8).astype(float) for _ in range(3)]
    lo, hi = st.repetitions_mean_ci(alike)
    plo, phi = st.bootstrap_mean_ci(np.concatenate(alike))
    assert hi - lo == pytest.approx(phi - plo, rel=0.5)
    assert st.repetitions_mean_ci(passes[:1]) == st.bootstrap_mean_ci(passes[0])
    # Paired differences resample the same way.
    d = st.paired_difference_by_repetition(passes, [np.full(60, 0.75)] * 2)
    assert d["n_pairs"] == 120 and d["ci95"][0] < 0 < d["ci95"][1]


def test_max_rate_ci_counts_repetitions():
    rng = np.random.default_rng(2)
    steady = {1.0: [rng.random(60) < 0.99], 2.0: [rng.random(60) < 0.93 for _ in range(3)],
              3.0: [rng.random(60) < 0.5]}
    split = {**steady, 2.0: [rng.random(60) < p for p in (0.99, 0.99, 0.8)]}
    narrow, wide = st.max_rate_at(steady), st.max_rate_at(split)
    assert np.diff(wide["ci95"])[0] > np.diff(narrow["ci95"])[0]


def test_crossing_rate_interpolation_and_bounds():
    assert st.crossing_rate([1, 2, 3], [1.0, 0.95, 0.85]) == (pytest.approx(2.5), "interpolated")
    assert st.crossing_rate([3, 1, 2], [0.85, 1.0, 0.95])[0] == pytest.approx(2.5)   # unsorted
    assert st.crossing_rate([1, 2], [0.99, 0.92]) == (2, "at_or_above_highest")
    assert st.crossing_rate([1, 2], [0.5, 0.2]) == (0.0, "below_lowest")
    # The first drop below target ends the search, even if a later rate recovers (noise).
    assert st.crossing_rate([1, 2, 3], [0.95, 0.85, 0.95])[0] == pytest.approx(1.5)


def test_max_rate_ci_over_requests():
    rng = np.random.default_rng(1)
    per_rate = {r: [rng.random(200) < p] for r, p in ((1.0, 1.0), (2.0, 0.95), (3.0, 0.8))}
    res = st.max_rate_at(per_rate, 0.9, n_boot=500)
    assert res["bound"] == "interpolated" and 2.0 <= res["rate_req_s"] <= 3.0
    lo, hi = res["ci95"]
    assert lo <= res["rate_req_s"] <= hi and 1.9 <= lo and hi <= 3.0
    more = {r: v * 4 for r, v in per_rate.items()}   # four repetitions: a narrower CI
    lo4, hi4 = st.max_rate_at(more, 0.9, n_boot=500)["ci95"]
    assert hi4 - lo4 < hi - lo


# -- aggregation and the JSON contract -------------------------------------------------------

def _fake_sweep():
    """Two policies on identical request sets, 3 rates, 2 repetitions, 2 SLO scales."""
    rng = np.random.default_rng(2)
    runs, samples = [], {}
    for ri, rate in enumerate((1.0, 2.0, 3.0)):
        for rep in range(2):
            for policy, slow in (("none", 1.0), ("specserve", 0.7)):
                run_id = f"fp32/code/model/{ri}/{rep}/{policy}"
                # TPOT grows with rate; specserve's is 30% lower on every request.
                samples[run_id] = [[0.1, float(0.02 * rate * slow * (1 + 0.3 * rng.random()))]
                                   for _ in range(60)]
                for scale in (2.0, 4.0):
                    runs.append({"regime": "fp32", "workload": "code:poisson",
                                 "drafter": "model", "slo_scale": scale, "policy": policy,
                                 "rate_req_s": rate, "repetition": rep, "run_id": run_id,
                                 "slo_ttft_s": 0.5, "slo_tpot_s": 0.025 * scale,
                                 "duration_s": 60.0, "output_tok_s": 10.0})
    return runs, samples


def test_merge_sweeps_joins_points_of_one_sweep_and_refuses_others():
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_sweeps", ROOT / "scripts/merge_sweeps.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    runs, samples = _fake_sweep()
    cal = {"fp32": {"code:poisson": {"single_stream_ttft_s": 0.2, "capacity_req_s": 3.0}}}

    def report(rates, **extra):
        rs = [r for r in runs if r["rate_req_s"] in rates]
        return {"calibration": json.loads(json.dumps(cal)), "slos": [], "slo_rule": "x",
                "runs": rs, "samples": {r["run_id"]: samples[r["run_id"]] for r in rs},
                "partial": False, **extra}

    low, high = report((1.0, 2.0)), report((3.0,))
    high["calibration"]["fp32"]["code:poisson"]["max_model_len"] = 1024   # added on reuse
    out = ms.merge([low, high])
    assert len(out["runs"]) == len(runs) and set(out["samples"]) == set(samples)
    whole = agg.max_rates(runs, samples)
    assert [r["rate_req_s"] for r in out["max_rate_at_90"]] == [r["rate_req_s"] for r in whole]
    other = report((3.0,))
    other["calibration"]["fp32"]["code:poisson"]["capacity_req_s"] = 2.5
    with pytest.raises(SystemExit, match="calibration"):
        ms.merge([low, other])
    with pytest.raises(SystemExit, match="repeats runs"):
        ms.merge([low, report((2.0,))])
    with pytest.raises(SystemExit, match="partial"):
        ms.merge([low, report((3.0,), partial=True)])


def test_aggregate_max_rate_paired_curves_shape():
    runs, samples = _fake_sweep()
    rows = agg.max_rates(runs, samples, n_boot=200)
    assert len(rows) == 4      # 2 scales x 2 policies
    for r in rows:
        assert set(r) >= {"regime", "workload", "drafter", "slo_scale", "policy", "rate_req_s",
                          "ci95"}
        assert len(r["ci95"]) == 2 and r["ci95"][0] <= r["rate_req_s"] <= r["ci95"][1]
    by = {(r["slo_scale"], r["policy"]): r["rate_req_s"] for r in rows}
    assert by[(2.0, "specserve")] > by[(2.0, "none")]
    assert by[(4.0, "none")] > by[(2.0, "none")]
    pairs = agg.paired(runs, samples, "specserve", n_boot=200)
    assert {p["policy"] for p in pairs} == {"none"} and len(pairs) == 6
    at2 = next(p for p in pairs if p["slo_scale"] == 2.0 and p["rate_req_s"] == 2.0)
    assert at2["repetitions"] == 2 and at2["attainment_diff"]["n_pairs"] == 120
    assert at2["tpot_ms_diff"]["mean_diff"] < 0 and at2["tpot_ms_diff"]["significant"]
    curves = agg.curves(runs, samples, n_boot=200)
    assert len(curves) == 12 and all(c["attainment_ci95"][0] <= c["attainment"] <=
                                     c["attainment_ci95"][1] for c in curves)
    json.dumps({"max_rate_at_90": rows, "paired": pairs, "curves": curves})
    table = agg.max_rate_table(rows)
    assert table.count("\n") == 5 and "specserve" in table
    assert "specserve" in agg.curve_table(curves)


def test_deciding_rates():
    att = {"none": {1.0: 0.95, 2.0: 0.5, 3.0: 0.1}, "a": {1.0: 0.99, 2.0: 0.95, 3.0: 0.4},
           "b": {1.0: 0.97, 2.0: 0.6, 3.0: 0.2}}
    assert agg.deciding_rates(att, 0.9, limit=2) == [1.0, 2.0]
    assert agg.deciding_rates(att, 0.9, limit=1) == [2.0]
    assert agg.deciding_rates({"x": {1.0: 1.0}}, 0.9) == []


def test_seed_for_is_stable():
    from specserve_ray.bench.sweep import seed_for

    assert seed_for(0, "code:poisson", 1, 2) == seed_for(0, "code:poisson", 1, 2)
    assert seed_for(0, "code:poisson", 1, 2) != seed_for(0, "code:poisson", 1, 3)


# -- checkpoints and --resume ----------------------------------------------------------------
def test_checkpoint_is_a_partial_report_and_resume_checks_the_setup(tmp_path):
    from types import SimpleNamespace

    from specserve_ray.bench.sweep import checkpoint, load_resumable

    path = tmp_path / "sweep.json"
    setup = {"workloads": ["code"], "load_levels": [["0.4", 0.4, None]], "seed": 0,
             "calibration_from": "cal.json"}
    report = {"setup": setup, "runs": [{"run_id": "a"}], "samples": {"a": [[0.1, 0.02]]},
              "calibration": {"fp32": {"code:poisson": {"capacity_req_s": 3.0}}}}
    checkpoint(SimpleNamespace(json=str(path)), report)
    written = json.loads(path.read_text())
    assert written["partial"] is True and written["samples"] == report["samples"]
    assert not (tmp_path / "sweep.json.tmp").exists()
    checkpoint(SimpleNamespace(json=None), report)          # no --json: nothing written
    # The same sweep (calibration_from may differ) resumes; another one is refused.
    assert load_resumable(str(path), {**setup, "calibration_from": None})["runs"] == [
        {"run_id": "a"}]
    with pytest.raises(SystemExit, match="seed"):
        load_resumable(str(path), {**setup, "seed": 1})
    (tmp_path / "other.json").write_text(json.dumps({"setup": setup}))
    with pytest.raises(SystemExit, match="not a sweep report"):
        load_resumable(str(tmp_path / "other.json"), setup)


def test_resumed_runs_are_not_run_again(tmp_path):
    """_run_point skips every (policy) run whose id the report already holds and runs the
    rest; each new run is checkpointed."""
    from types import SimpleNamespace

    from specserve_ray.bench import sweep as sw
    from specserve_ray.bench.slo_rule import SloRule

    args = SimpleNamespace(duration=1.0, min_requests=2, max_requests=10, seed=0,
                           drafter="model", policies=["none", "static:1", "specserve"],
                           load_levels=[("0.5", 0.5, None)], json=str(tmp_path / "r.json"))
    reqs = [SimpleNamespace(input_tokens=8, output_tokens=4, arrival_s=0.0),
            SimpleNamespace(input_tokens=8, output_tokens=4, arrival_s=0.5)]
    ran = []

    def run_one(url, switcher, model, policy, reqs_, prompts, desc):
        ran.append(policy)
        recs = [RequestRecord(i, 8, 4, 0.0, 0.05, [0.05, 0.07, 0.09, 0.11], 0.11, 4)
                for i in range(2)]
        return {"records": recs, "duration": 1.0, "client": {"cpu_share_of_one_core": 0.0}}, \
            {}, {}

    fake = SimpleNamespace(args=args, requests=lambda *a: reqs, run_one=run_one,
                           prompts=SimpleNamespace(prompts=lambda lens, offset: ["x"] * len(lens)))
    kept = "fp32/code:poisson/model/0/0/static:1"
    report = {"runs": [], "samples": {kept: [[0.05, 0.02]]}, "errors": []}
    bar = SimpleNamespace(update=lambda n: None, set_description=lambda d: None)
    rules = [SloRule(500.0, 100.0, 2.0)]
    ctx = ("url", None, "m", None, "poisson", "code:poisson", 0, 128, None, rules, [1.0])
    sw._run_point(fake, "fp32", ctx, 0, 0, report, bar)
    assert sorted(ran) == ["none", "specserve"]
    assert set(report["samples"]) == {kept, "fp32/code:poisson/model/0/0/none",
                                      "fp32/code:poisson/model/0/0/specserve"}
    assert json.loads((tmp_path / "r.json").read_text())["partial"] is True


# -- smoke: the whole command against a real local Serve app ---------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sweep_smoke_against_a_real_app(trace_dir, tmp_path):
    """A tiny sweep (2 policies, 1 rate) end to end: real Ray Serve app, real HTTP from the
    niced client process; the JSON keeps its contract and the request sets are paired."""
    import os
    import subprocess

    out = tmp_path / "sweep.json"
    # A fixed calibration (the --calibration-from path) keeps the test short: no capacity
    # run; the SLOs still follow the rule from these single-stream figures.
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"calibration": {"fp32": {"code:poisson": {
        "policy": "none", "single_stream_ttft_s": 0.2, "single_stream_tpot_s": 0.03,
        "capacity_req_s": 2.0}}}}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "specserve_ray.bench", "sweep", "--trace-dir", str(trace_dir),
           "--regime", "fp32", "--workloads", "code", "--policies", "none", "static:1",
           "--max-k", "2", "--loads", "1.0", "--duration", "3", "--min-requests", "4",
           "--max-num-seqs", "4", "--input-budget", "96", "--warmup-requests", "0",
           "--drafter", "ngram",
           "--slo-scales", "2", "4", "--deciding-repetitions", "1", "--no-plots",
           "--calibration-from", str(cal),
           "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not report["errors"], report["errors"]
    runs = report["runs"]
    assert len(runs) == 4      # 2 policies x 2 SLO scales
    assert {(r["policy"], r["slo_scale"]) for r in runs} == {
        ("none", 2.0), ("none", 4.0), ("static:1", 2.0), ("static:1", 4.0)}
    for r in runs:
        assert r["workload"] == "code:poisson" and r["drafter"] == "ngram"
        assert r["repetition"] == 0 and r["failed"] == 0 and r["num_requests"] >= 4
        # The app really ran the n-gram drafter: the draft model proposed nothing.
        assert r["server"]["draft_tokens_by_drafter"].get("model", 0) == 0, r["server"]
    a, b = (report["samples"][r["run_id"]] for r in runs if r["slo_scale"] == 2.0)
    assert len(a) == len(b) >= 4 and all(x is not None for x in a + b)
    rows = report["max_rate_at_90"]
    assert len(rows) == 4 and all(len(r["ci95"]) == 2 for r in rows)
    assert {s["slo_scale"] for s in report["slos"]} == {2.0, 4.0}
    s2 = next(s for s in report["slos"] if s["slo_scale"] == 2.0)
    assert s2["tpot_ms"] == pytest.approx(60.0) and s2["ttft_ms"] == pytest.approx(400.0)
    # The per-prompt TTFT rule (the default): the given calibration had no TTFT curve, so
    # the sweep measured one on the app, one request at a time, and judged every request at
    # its own prompt length, which the samples keep.
    cal_out = report["calibration"]["fp32"]["code:poisson"]
    assert cal_out["ttft_curve_measured_later"] is True
    lengths = {p for p, _ in cal_out["single_stream_ttft_by_prompt"]}
    assert len(lengths) >= 2 and all(0 < t < 5 for _, t in cal_out["single_stream_ttft_by_prompt"])
    assert len(s2["ttft_ms_by_prompt_tokens"]) == len(lengths)
    assert all(r["slo_ttft_curve_ms"] == next(
        s["ttft_ms_by_prompt_tokens"] for s in report["slos"] if s["slo_scale"] == r["slo_scale"])
        for r in runs)
    assert all(len(x) == 3 and x[2] > 0 for x in a + b)
    assert "at that request's prompt length" in report["slo_rule"]
    assert runs[0]["rate_req_s"] == pytest.approx(2.0)    # 1.0 x the given capacity
    assert report["client"]["nice"] == 19 and report["client"]["cpu_s"] > 0
    assert all(r["client"]["nice"] == 19 for r in runs)


def test_server_worker_niceness_from_the_environment():
    from specserve_ray.bench.client import server_worker_nice

    assert server_worker_nice({"RAY_worker_niceness": "0"}) == 0     # the Makefile's setting
    assert server_worker_nice({"RAY_worker_niceness": "15"}) == 15   # Ray's own default
    assert server_worker_nice({}) == 0                # what control.start_app sets if unset
    assert server_worker_nice({"RAY_worker_niceness": "x"}) == 0
