"""The sweep's SLO rule (specserve_ray/bench/slo_rule.py): budgets by scale, the per-prompt
TTFT curve, which requests meet it, and the server-side class it becomes (pure, fast)."""
from __future__ import annotations

import json

import pytest

from specserve_ray.bench import aggregate as agg
from specserve_ray.bench import slo_rule as sr


def test_slo_rule_scales_and_direct_budgets():
    rules = sr.slo_rules(0.25, 0.030, [2, 4])
    assert [(r.scale, r.ttft_ms, r.tpot_ms) for r in rules] == [(2, 500, 60), (4, 1000, 120)]
    assert sr.slo_rules(0.25, 0.03, [2, 4], ttft_ms=300, tpot_ms=50) == [
        sr.SloRule(300, 50, None)]
    assert sr.slo_rules(0.25, 0.03, [2], tpot_ms=50) == [sr.SloRule(500, 50, 2)]
    with pytest.raises(ValueError):
        sr.slo_rules(0.25, 0.03, [0])
    with pytest.raises(ValueError):
        sr.slo_rules(0.0, 0.03, [2])
    rule = sr.SloRule(500, 60, 2)
    flags = sr.met([(0.4, 0.05), (0.6, 0.05), (0.4, 0.07), (0.5, None), None], rule)
    assert flags.tolist() == [True, False, False, True, False]
    assert json.loads(json.dumps(rule.as_json())) == {"slo_scale": 2, "ttft_ms": 500,
                                                      "tpot_ms": 60}


def test_ttft_curve_is_monotone_interpolated_and_extrapolated():
    # Repeats at one length -> their median; a dip from noise is flattened.
    curve = sr.monotone_curve([(100, 0.10), (100, 0.14), (100, 0.12), (400, 0.30),
                               (250, 0.28), (250, 0.26)])
    assert curve == ((100.0, 0.12), (250.0, 0.27), (400.0, 0.30))
    assert sr.monotone_curve([(300, 0.3), (600, 0.2)]) == ((300.0, 0.3), (600.0, 0.3))
    assert sr.curve_at(curve, 50) == pytest.approx(0.12)            # flat below
    assert sr.curve_at(curve, 175) == pytest.approx(0.195)          # linear between
    assert sr.curve_at(curve, 700) == pytest.approx(0.30 + 0.0002 * 300)   # last slope
    assert sr.curve_at(((10.0, 5.0),), 1e6) == 5.0
    with pytest.raises(ValueError):
        sr.monotone_curve([])


def test_per_prompt_slo_rule_scales_the_curve_and_needs_prompt_lengths():
    points = [(100, 0.1), (500, 0.3)]
    r2, r4 = sr.slo_rules(0.2, 0.03, [2, 4], ttft_curve_s=points)
    assert r2.ttft_curve == ((100.0, 200.0), (500.0, 600.0))
    assert r4.ttft_budget_ms(300) == pytest.approx(800.0)
    assert r2.ttft_ms == pytest.approx(400.0)        # the median prompt's, for headlines
    # A TTFT set directly is one budget for all, whatever the curve.
    assert sr.slo_rules(0.2, 0.03, [2], ttft_ms=300, ttft_curve_s=points)[0].ttft_curve == ()
    flags = sr.met([(0.35, 0.05, 100), (0.35, 0.05, 400), (0.35, 0.07, 400), None], r2)
    assert flags.tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="prompt length"):
        sr.met([(0.35, 0.05)], r2)
    assert r2.as_json()["ttft_ms_by_prompt_tokens"] == [[100, 200.0], [500, 600.0]]
    # The server-side class carries the rule as a line: ttft_s + per token x prompt tokens.
    cls = sr.bench_slo_class(r2)
    assert cls["name"] == "bench" and cls["tpot_s"] == pytest.approx(0.06)
    assert cls["ttft_s"] == pytest.approx(0.1) and cls["ttft_per_prompt_token_s"] == \
        pytest.approx(0.001)
    assert "ttft_per_prompt_token_s" not in sr.bench_slo_class(sr.SloRule(300, 50, 2))
    assert sr.linear_fit(((5.0, 40.0),)) == (40.0, 0.0)
    base, slope = sr.linear_fit(((0.0, 10.0), (100.0, 5.0)))     # never a shrinking budget
    assert slope == 0.0 and base == pytest.approx(7.5)
    # aggregate reads the curve back from a run entry and the length from the sample
    run = {"slo_ttft_s": 0.4, "slo_tpot_s": 0.06, "slo_scale": 2,
           "slo_ttft_curve_ms": [[100, 200.0], [500, 600.0]], "run_id": "x"}
    assert agg._rule(run) == r2
    assert agg._outcomes({"x": [[0.3, 0.05, 400], None, [0.1, None]]}, run) == [
        (0.3, 0.05, 400), None, (0.1, None, None)]
