"""`bench load`'s summary (pure): chunk gaps, TTFT ratios against single stream, refusals,
the goals, and the closed-loop capacity's steady window."""
from __future__ import annotations

import pytest

from specserve_ray.bench.loadgen import RequestRecord


def test_load_summary_ratios_and_refusals():
    from specserve_ray.bench.load import summarize, table

    def rec(i, sent, chunks, error=None):
        r = RequestRecord(i, 640, 10, sent, chunks[0] if chunks else None, chunks,
                          chunks[-1] if chunks else None, len(chunks), error)
        return r

    single = [rec(i, 0.0, [0.2, 0.24, 0.28, 0.32]) for i in range(4)]     # gaps 40 ms
    loaded = [rec(0, 0.0, [0.3, 0.34, 0.74, 0.78]), rec(1, 0.0, [0.6, 0.64, 0.68]),
              rec(2, 0.0, [], error="http 503: queue full")]
    s = summarize(single, loaded)
    assert s["single"]["chunk_gap_p50_s"] == pytest.approx(0.04)
    assert s["load"]["refusals"] == 1 and s["load"]["failed"] == 1
    assert s["ratios"]["ttft_p50_vs_single"] == pytest.approx(0.45 / 0.2)
    assert s["ratios"]["chunk_gap_p99_vs_single_median"] > 9
    assert s["goals"]["met"] == {"chunk_gap_p99_vs_single_median": False,
                                 "ttft_p50_vs_single": False, "ttft_p99_vs_single": True,
                                 "refusals": False}
    s.update({"rate_req_s": 0.7, "fraction": 0.7, "capacity_req_s": 1.0})
    assert "refusals" in table(s)


def test_steady_capacity_ignores_the_closed_loop_tail():
    """2 clients, each request 1 s, then one 10 s straggler sent last: the whole-run rate
    is dragged down by the tail, the steady window (first completion .. last send) is not."""
    from specserve_ray.bench.load import steady_capacity

    def rec(i, sent, end):
        return RequestRecord(i, 8, 4, sent, sent + 0.1, [sent + 0.1], end, 4, None)

    records = [rec(2 * j + c, float(j), float(j + 1)) for j in range(8) for c in range(2)]
    records.append(rec(16, 8.0, 18.0))                       # the straggler, sent last
    assert steady_capacity(records, 18.0) == pytest.approx(2.0, rel=0.15)
    assert len([r for r in records if r.ok]) / 18.0 < 1.0      # what the whole run says
    # Too few completions in the window: the whole-run rate.
    assert steady_capacity(records[:2], 2.0) == pytest.approx(1.0)
