"""bench deploy's pure parts: the step split from two /v1/stats snapshots, and spreads."""
from specserve_ray.bench.deploy import spread, step_split
from specserve_ray.stats import StepTotals
from specserve_ray.step_timing import StepTiming, hop_times


def _snapshot(totals: StepTotals) -> dict:
    return {"step_time_s": totals.summary()}


def test_router_and_transport_share_counts_planning_applying_and_hops():
    totals = StepTotals()
    before = _snapshot(totals)
    from specserve_ray.stats import StepStats
    for _ in range(4):
        totals.add(StepStats(1, 4, 2, 3, draft_seconds=0.003, verify_seconds=0.010,
                             total_seconds=0.018))
        # execute 18 ms: draft 3 + target 10 inside the actors, 5 ms of hops
        timing = hop_times(100.0, 100.018, (100.001, 100.004, 100.006, 100.016))
        totals.add_router(StepTiming(plan=0.001, apply=0.001, loop_wait=0.0,
                                     transport=timing.transport, to_draft=timing.to_draft,
                                     draft_to_target=timing.draft_to_target,
                                     to_router=timing.to_router, worker_busy=timing.worker_busy))
    out = step_split(before, _snapshot(totals))
    assert abs(out["mean_cycle_ms"] - 20.0) < 1e-6
    # plan 1 + apply 1 + hops 5 (1 to the draft, 2 draft -> target, 2 back) of 20 ms
    assert abs(out["router_transport_share"] - 0.35) < 1e-6
    per = out["per_step_ms"]
    assert abs(per["to_draft"] - 1.0) < 1e-6 and abs(per["draft_to_target"] - 2.0) < 1e-6
    assert abs(per["to_router"] - 2.0) < 1e-6 and abs(per["transport"] - 5.0) < 1e-6


def test_hops_without_a_draft_and_across_hosts():
    alone = hop_times(0.0, 0.020, (None, None, 0.004, 0.016))
    assert abs(alone.transport - 0.008) < 1e-9 and alone.draft_to_target is None
    # A clock offset between hosts: the split is dropped, the sum is kept.
    skewed = hop_times(0.0, 0.020, (-5.0, -4.997, -4.995, -4.985))
    assert skewed.to_draft is None and abs(skewed.transport - 0.007) < 1e-9
    assert hop_times(0.0, 1.0, None).transport is None


def test_spread_reports_median_and_range():
    s = spread([1.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert spread([1.0, 2.0])["median"] == 1.5


def test_single_repeats_reads_the_hf_setting_it_re_times():
    from specserve_ray.bench.single_repeats import _hf_setting

    assert _hf_setting("defaults") == (None, None, False)
    assert _hf_setting(None) == (None, None, False)
    assert _hf_setting("n=5,threshold=0.4") == (5, 0.4, False)
    assert _hf_setting("n=8,threshold=0.0,prepacked") == (8, 0.0, True)
