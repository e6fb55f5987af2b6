"""The trace benchmark's pure parts: trace loading, scaling, arrivals, prompts, metrics,
the JSON contract; the synthetic-acceptance hook and the chosen-k histogram.

The end-to-end sweep against a real app is the slow smoke test in test_bench_sweep.py and
`python -m specserve_ray.bench sweep --quick` (README)."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

from specserve_ray.bench import trace as tr
from specserve_ray.bench.loadgen import RequestRecord
from specserve_ray.bench.report import (RUN_KEYS, latency_summary, markdown_table, meets_slo,
                                        outcomes, run_entry, run_metrics, server_delta)
from specserve_ray.bench.slo_rule import SloRule

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:05.0781490,110,27
2023-11-16 18:17:07.1206440,7433,1
"""


@pytest.fixture
def trace_csv(tmp_path):
    path = tmp_path / "AzureLLMInferenceTrace_code.csv"
    path.write_text(CSV)
    return str(path)


def test_load_trace_relative_times_and_lengths(trace_csv):
    reqs = tr.load_trace(trace_csv)
    assert [r.input_tokens for r in reqs] == [4808, 3180, 110, 7433]
    assert [r.output_tokens for r in reqs] == [10, 8, 27, 1]
    # Seven fractional digits are parsed, relative to the first row.
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(0.052, abs=1e-6)
    assert reqs[3].arrival_s == pytest.approx(3.140684, abs=1e-6)
    assert len(tr.load_trace(trace_csv, limit=2)) == 2


def test_load_trace_numeric_timestamps_unsorted(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,5,6\n10.0,7,8\n")
    reqs = tr.load_trace(str(p))
    assert [(r.arrival_s, r.input_tokens) for r in reqs] == [(0.0, 7), (0.5, 5)]


@pytest.mark.parametrize("content, needle", [
    ("a,b\n1,2\n", "missing column"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nnot-a-time,1,2\n", "bad row"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,x,2\n", "bad row"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no rows"),
])
def test_bad_trace_files_say_why(tmp_path, content, needle):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(tr.TraceError, match=needle):
        tr.load_trace(str(p))
    with pytest.raises(tr.TraceError, match="not found"):
        tr.load_trace(str(tmp_path / "missing.csv"))


def test_cli_rejects_bad_input(tmp_path, trace_csv, capsys):
    from specserve_ray.bench.__main__ import main

    with pytest.raises(SystemExit, match="no such file"):
        main(["trace", "--trace", str(tmp_path / "nope.csv"), "--dry-run"])
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "AzureLLMInferenceTrace_code.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="missing column"):
        main(["trace", "--trace", str(bad), "--dry-run", "--workloads", "code"])
    with pytest.raises(SystemExit, match="--max-k"):
        main(["trace", "--trace", trace_csv, "--dry-run", "--max-k", "3",
              "--workloads", "code"])   # static:5
    with pytest.raises(SystemExit, match="cannot switch"):
        main(["trace", "--trace", trace_csv, "--dry-run", "--url", "http://x:1",
              "--workloads", "code"])
    with pytest.raises(SystemExit, match="--loads"):
        main(["trace", "--trace", trace_csv, "--dry-run", "--loads", "low",
              "--workloads", "code"])
    with pytest.raises(SystemExit, match="--workloads"):
        main(["sweep", "--trace-dir", str(tmp_path), "--dry-run", "--workloads", "nope"])
    with pytest.raises(SystemExit, match="not found"):   # the conversation trace is missing
        main(["sweep", "--trace-dir", str(tmp_path), "--dry-run", "--workloads",
              "conv-decode"])
    main(["trace", "--trace", trace_csv, "--dry-run", "--workloads", "code"])
    assert "estimated" in capsys.readouterr().out


def test_time_scaling_to_a_rate(trace_csv):
    reqs = tr.load_trace(trace_csv)
    assert tr.mean_rate(reqs) == pytest.approx(3 / reqs[-1].arrival_s)
    fast = tr.scale_to_rate(reqs, 10.0)
    assert tr.mean_rate(fast) == pytest.approx(10.0)
    # The burst shape survives: gaps keep their proportions.
    ratio = [b.arrival_s / a.arrival_s for a, b in zip(reqs[1:], fast[1:])]
    assert max(ratio) == pytest.approx(min(ratio))
    assert [r.arrival_s for r in tr.scale_time(reqs, 2.0)] == [2 * r.arrival_s for r in reqs]
    with pytest.raises(ValueError):
        tr.scale_time(reqs, 0)


def test_window_wraps_and_rebases(trace_csv):
    reqs = tr.load_trace(trace_csv)
    w = tr.window(reqs, start_s=1.0, count=6)
    assert w[0].arrival_s == 0.0 and w[0].input_tokens == 110
    assert [r.input_tokens for r in w] == [110, 7433, 4808, 3180, 110, 7433]
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(w, w[1:]))


def test_length_scaling_and_capping(trace_csv):
    reqs = tr.load_trace(trace_csv)
    fitted = tr.fit_lengths(reqs, max_model_len=1024, input_scale=0.1, max_output_tokens=16)
    assert all(r.input_tokens + r.output_tokens <= 1024 for r in fitted)
    assert [r.output_tokens for r in fitted] == [10, 8, 16, 2]      # capped; >= 2 for a TPOT
    assert [r.input_tokens for r in fitted] == [481, 318, 11, 743]
    tight = tr.fit_lengths(reqs, max_model_len=64)
    assert all(r.input_tokens + r.output_tokens <= 64 and r.input_tokens >= 1 for r in tight)
    scale = tr.auto_input_scale(reqs, 900, quantile=1.0)
    assert scale == pytest.approx(900 / 7433)
    assert tr.auto_input_scale([tr.TraceRequest(0, 10, 1)], 900) == 1.0   # never scales up


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_arrivals_rate_and_cv(burstiness):
    times = tr.gamma_arrivals(rate=5.0, count=20001, burstiness=burstiness, seed=1)
    gaps = np.diff(times)
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    assert tr.poisson_arrivals(5.0, 10, seed=3) == tr.gamma_arrivals(5.0, 10, 1.0, seed=3)


def test_prompts_cut_to_exact_token_counts():
    from specserve_ray.bench.workload import PromptSource, cut_prompt, load_tokenizer

    tok = load_tokenizer()
    src = PromptSource(tok, seed=0)
    for i, n in enumerate([1, 2, 7, 64, 333, 900]):
        text = src.prompt(i, n)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == n
        assert src.prompt(i, n) == text          # deterministic: same work for every policy
    ids = tok("def f(x):\n    return x + 1\n", add_special_tokens=False)["input_ids"]
    assert len(tok(cut_prompt(tok, ids, 5), add_special_tokens=False)["input_ids"]) == 5


def _rec(i, sent, first, chunks, end, tokens, error=None):
    return RequestRecord(i, 10, tokens, sent, first, chunks, end, tokens, error)


def test_metrics_on_hand_made_timings():
    records = [
        _rec(0, 0.0, 0.1, [0.1, 0.2, 0.3], 0.3, 5),    # TTFT .1, TPOT .05
        _rec(1, 0.5, 1.5, [1.5, 1.9], 1.9, 3),         # TTFT 1.0 (misses), TPOT .2
        _rec(2, 1.0, 1.2, [1.2, 2.0], 2.0, 3),         # TTFT .2, TPOT .4 (misses)
        _rec(3, 1.0, None, [], None, 3, error="http 503: full"),
    ]
    slo = SloRule(ttft_ms=500, tpot_ms=300, scale=None)
    assert [meets_slo(r, slo) for r in records] == [True, False, False, False]
    m = run_metrics(records, duration_s=2.0, slo=slo)
    assert m["completed"] == 3 and m["failed"] == 1 and m["errors"] == {"http 503": 1}
    assert m["goodput_req_s"] == pytest.approx(0.5)
    assert m["slo_attainment"] == pytest.approx(0.25)
    assert m["output_tok_s"] == pytest.approx(11 / 2.0)
    assert m["ttft_p50_s"] == pytest.approx(0.2)
    assert m["tpot_mean_s"] == pytest.approx((0.05 + 0.2 + 0.4) / 3)
    assert m["e2e_p50_s"] == pytest.approx(1.0)
    assert m["itl_mean_s"] == pytest.approx(statistics.mean([0.1, 0.1, 0.4, 0.8]))
    s = latency_summary(list(range(101)))
    assert (s["p50"], s["p90"], s["p99"], s["mean"]) == (50, 90, 99, 50)
    assert latency_summary([])["p99"] is None


def test_per_prompt_ttft_rule_judges_each_request_at_its_own_prompt_length():
    """Two requests with the same 0.3 s TTFT: the 100-token prompt misses a budget that grows
    with the prompt, the 900-token one meets it; the samples keep each prompt's length."""
    short = RequestRecord(0, 100, 3, 0.0, 0.3, [0.3, 0.35, 0.4], 0.4, 3)
    long_ = RequestRecord(1, 900, 3, 0.0, 0.3, [0.3, 0.35, 0.4], 0.4, 3)
    rule = SloRule(200, 100, 2.0, ((100.0, 200.0), (500.0, 400.0)))
    assert [meets_slo(r, rule) for r in (short, long_)] == [False, True]
    m = run_metrics([short, long_], 1.0, rule)
    assert m["slo_attainment"] == pytest.approx(0.5)
    assert m["slo_ttft_curve_ms"] == [[100, 200.0], [500, 400.0]]
    assert outcomes([short, long_])[1] == [0.3, pytest.approx(0.05), 900]
    assert "slo_ttft_curve_ms" not in run_metrics([short], 1.0, SloRule(200, 100, 2.0))


def test_server_delta_and_chosen_k_distribution():
    before = {"speculation": {"num_steps": 10, "num_accepted_tokens": 5, "num_draft_tokens": 20},
              "step_time_s": {"steps": 4, "rows": 10, "total": 1.0, "draft": 0.2},
              "chosen_k_counts": [1, 2]}
    after = {"speculation": {"num_steps": 30, "num_accepted_tokens": 35, "num_draft_tokens": 80},
             "step_time_s": {"steps": 14, "rows": 30, "total": 3.0, "draft": 0.7,
                             "verify": 1.5},
             "chosen_k_counts": [3, 2, 0, 8, 0, 8]}
    d = server_delta(before, after)
    assert d["mean_acceptance_length"] == pytest.approx(1 + 30 / 20)
    assert d["acceptance_rate"] == pytest.approx(0.5)
    assert d["chosen_k_counts"] == [2, 0, 0, 8, 0, 8]
    assert sum(d["chosen_k_dist"]) == pytest.approx(1.0)
    assert d["mean_chosen_k"] == pytest.approx((24 + 40) / 18)
    assert d["mean_batch_size"] == pytest.approx(2.0)
    # per step, over the run's steps; a key the server does not report is left out
    assert d["step_split_s"] == {"draft": pytest.approx(0.05), "verify": pytest.approx(0.15)}
    assert "draft_tokens_by_drafter" not in d      # an older server: no per-drafter totals
    before["speculation"]["per_drafter"] = {"model": {"num_draft_tokens": 20}}
    after["speculation"]["per_drafter"] = {"model": {"num_draft_tokens": 50},
                                           "ngram": {"num_draft_tokens": 30}}
    assert server_delta(before, after)["draft_tokens_by_drafter"] == {"model": 30, "ngram": 30}
    assert "prefill_capped_steps" not in server_delta(before, after)
    before["prefill_capped_steps"], after["prefill_capped_steps"] = 3, 10
    assert server_delta(before, after)["prefill_capped_steps"] == 7


def test_run_entry_json_schema_and_table():
    records = [_rec(0, 0.0, 0.1, [0.1, 0.3], 0.3, 3)]
    m = run_metrics(records, 1.0, SloRule(1000, 1000, None))
    entry = run_entry("fp32", "specserve", "low", 0.3, 1.5, "trace", None, m,
                      {"mean_acceptance_length": 2.0, "chosen_k_dist": [0.5, 0.5]}, [0.1],
                      workload="code:poisson", drafter="model", repetition=0, slo_scale=2.0,
                      rate_req_s=1.5, run_id="fp32/code/model/0/0/specserve")
    entry = json.loads(json.dumps(entry))      # JSON-serialisable as is
    for key in RUN_KEYS + ("request_rate", "goodput_req_s", "slo_attainment", "output_tok_s",
                           "ttft_p50_s", "tpot_p50_s", "tpot_p99_s", "mean_acceptance_length"):
        assert key in entry, key
    assert entry["goodput_req_s"] == 1.0 and entry["slo_attainment"] == 1.0
    table = markdown_table([entry])
    assert table.count("\n") == 2 and "specserve" in table


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from specserve_ray.bench.plots import write_plots

    curves, runs = [], []
    for rate in (1.0, 3.0):
        for policy in ("none", "specserve"):
            cell = {"regime": "fp32", "workload": "code:poisson", "drafter": "model",
                    "slo_scale": 2.0, "policy": policy, "rate_req_s": rate}
            curves.append({**cell, "attainment": 0.5, "attainment_ci95": [0.4, 0.6],
                           "goodput_req_s": rate / 2, "goodput_ci95": [rate / 3, rate / 1.5]})
            runs.append({**cell, "repetition": 0, "tpot_samples_s": [0.02, 0.03, 0.05],
                         "slo_tpot_s": 0.04})
    paths = write_plots(curves, runs, str(tmp_path))
    assert len(paths) == 2 and all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)


# -- synthetic acceptance (benchmark only) and the chosen-k histogram -------------------------
def test_synthetic_accept_rate_and_shape():
    from specserve_ray.core.rejection import PLACEHOLDER_TOKEN_ID
    from specserve_ray.workers.synthetic import synthetic_accept

    batch, k = 4000, 4
    drafts = torch.randint(0, 100, (batch, k))
    n_draft = torch.full((batch,), k)
    n_draft[:1000] = 2
    argmax = torch.randint(100, 200, (batch, k + 1))
    gen = torch.Generator().manual_seed(0)
    argmax[:100, :] = drafts[:100, :1]       # the target agrees with a rejected draft token
    out, emitted = synthetic_accept(drafts, n_draft, argmax, 0.6, 200, gen)
    accepted = emitted - 1
    assert int(accepted[:1000].max()) <= 2 and int(accepted.max()) <= k
    # Leading successes of Bernoulli(0.6) over 4 positions: E = .6 + .36 + .216 + .1296.
    assert float(accepted[1000:].float().mean()) == pytest.approx(1.3056, rel=0.05)
    for i in range(2000):
        n = int(accepted[i])
        assert out[i, :n].tolist() == drafts[i, :n].tolist()
        if n < int(n_draft[i]):   # a rejection never emits the rejected draft token
            assert int(out[i, n]) != int(drafts[i, n])
        if i >= 100:
            assert int(out[i, n]) == int(argmax[i, n])
        assert (out[i, n + 1:] == PLACEHOLDER_TOKEN_ID).all()
    out0, e0 = synthetic_accept(drafts[100:], n_draft[100:], argmax[100:], 0.0, 200)
    assert (e0 == 1).all() and (out0[:, 0] == argmax[100:, 0]).all()
    _, e1 = synthetic_accept(drafts, n_draft, argmax, 1.0, 200)
    assert (e1 == n_draft + 1).all()


def test_synthetic_acceptance_in_the_engine_and_k_histogram():
    from specserve_ray.config import EngineConfig, SpeculationConfig
    from specserve_ray.sampling_params import SamplingParams
    from specserve_ray.engine import SpecEngine

    assert SpeculationConfig().synthetic_acceptance_rate is None      # never the default
    with pytest.raises(Exception):
        SpeculationConfig(synthetic_acceptance_rate=1.5)
    prompts = ["def f(x):\n", "import os\n", "class A:\n    def ", "    return self."]
    for rate in (1.0, 0.5):
        cfg = EngineConfig(speculation={"num_speculative_tokens": 3,
                                        "synthetic_acceptance_rate": rate},
                           limits={"max_model_len": 256, "max_num_seqs": 4})
        engine = SpecEngine.from_config(cfg)
        # Long enough that the draft's cache sync meets rejections the target agrees with.
        outs = engine.generate(prompts, SamplingParams(max_tokens=60, ignore_eos=True))
        assert all(len(o.output_ids) == 60 for o in outs)
        counts = engine.chooser.chosen_k_counts
        assert sum(counts) == engine.totals.num_steps and counts[3] > 0
        if rate == 1.0:   # every draft accepted: k + 1 = 4 tokens a step (last ones clamped)
            assert engine.totals.acceptance_rate == 1.0
            assert engine.totals.mean_acceptance_length > 3.0
        else:             # leading successes of Bernoulli(.5) over 3: E = .875 a step
            assert 0.6 < engine.totals.mean_acceptance_length - 1 < 1.15
