"""Router metrics: the pure aggregation, and the step hook on a real (in-process) step loop."""
from __future__ import annotations

import asyncio

import pytest

from helpers import tiny_model
from helpers import GREEDY, make_engine, perturbed, random_prompts
from specserve_ray.async_engine import AsyncSpecEngine
from specserve_ray.config import SloConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.metrics import Counts, MetricsAggregator, request_latency
from specserve_ray.policy.slo import SloClass, SloTracker, attainment_record
from specserve_ray.policy import CostModel
from specserve_ray.recorder import StepRecorder, slo_class_of
from specserve_ray.workers.host import run_draft, run_target


def test_step_aggregation_per_position_and_vllm_counters():
    agg = MetricsAggregator(now=0.0)
    # Rows: k=4 accepted 2; k=4 accepted 4; k=0 (plain); k=2 accepted 0.
    agg.observe_step(0.05, admitted=1, chosen_k=[4, 4, 0, 2], num_drafted=[4, 4, 0, 2],
                     num_accepted=[2, 4, 0, 0], num_emitted=10)
    agg.observe_step(0.01, admitted=2, chosen_k=[], num_drafted=[], num_accepted=[], num_emitted=0)
    delta = agg.drain(now=2.0, queue_depth=3, running=4)
    d = delta.counts
    assert (d.steps, d.decode_steps, d.decode_rows, d.admitted) == (2, 1, 4, 3)
    assert d.num_drafts == 3                      # the k=0 row is not a draft
    assert (d.num_draft_tokens, d.num_accepted_tokens, d.num_emitted_tokens) == (10, 6, 10)
    assert d.accepted_per_pos == [2, 2, 1, 1]      # position j: rows that accepted > j
    assert sum(d.accepted_per_pos) == d.num_accepted_tokens
    assert d.chosen_k_rows == {4: 2, 0: 1, 2: 1} and d.chosen_k_sum == 10
    assert d.mean_acceptance_length == pytest.approx(1 + 6 / 3)
    assert d.acceptance_rate == pytest.approx(0.6)
    assert d.first_position_acceptance == pytest.approx(2 / 3)
    assert delta.step_seconds == [0.05]            # decode steps only
    assert (delta.window_s, delta.queue_depth, delta.running) == (2.0, 3, 4)
    assert d.predicted_steps == 0                  # no cost model: nothing predicted


def test_drain_hands_out_increments_and_totals_add_up():
    agg = MetricsAggregator(now=0.0)
    agg.observe_step(0.02, 0, [3], [3], [3], 4, predicted_seconds=0.015, expected_tokens=3.5)
    first = agg.drain(1.0)
    agg.observe_step(0.04, 0, [1, 1], [1, 1], [1, 0], 3)
    chat = SloClass("chat", 0.5, 0.05)
    agg.observe_finished("chat", 0.2, 0.03, attainment_record(chat, 0.2, 0.03))
    agg.observe_finished("chat", 0.9, 0.03, attainment_record(chat, 0.9, 0.03))
    agg.observe_finished("batch", 0.1, None, None)   # no SLO: not an attainment sample
    second = agg.drain(3.0)
    assert first.counts.num_accepted_tokens == 3 and second.counts.num_accepted_tokens == 1
    assert first.counts.predicted_seconds == pytest.approx(0.015)
    assert first.counts.predicted_observed_seconds == pytest.approx(0.02)
    assert first.counts.expected_tokens == pytest.approx(3.5) and first.counts.expected_emitted == 4
    assert second.counts.predicted_steps == 0 and second.window_s == 2.0
    record = second.counts.slo["chat"]
    assert (record.requests, record.attained) == (2, 1) and second.counts.finished == 3
    assert second.counts.summary()["slo"] == {"chat": {"requests": 2, "attained": 1}}
    # One accounting: the scheduler's tracker sums the very same records.
    tracker = SloTracker()
    tracker.record(chat, 0.2, 0.03)
    tracker.record(chat, 0.9, 0.03)
    assert tracker.per_class["chat"] == record
    assert [c for c, _ in second.ttft] == ["chat", "chat", "batch"] and len(second.tpot) == 2
    assert agg.totals.num_accepted_tokens == 4 and agg.totals.accepted_per_pos == [2, 1, 1]
    assert agg.totals.num_drafts == 3 and agg.totals.decode_steps == 2
    agg.observe_step(0.01, 0, [1], [1], [1], 2)
    assert agg.current().num_accepted_tokens == 5 and agg.totals.num_accepted_tokens == 4
    third = agg.drain(3.5)
    assert third.counts.num_accepted_tokens == 1
    summed = Counts()
    summed.add(third.counts)
    summed.add(first.counts)
    summed.add(second.counts)
    assert summed.summary() == agg.totals.summary()
    assert agg.drain(4.0).counts.steps == 0        # nothing new since


def test_fault_events_and_recovery_times_are_drained_for_export():
    from specserve_ray.metrics import FaultCounts

    agg = MetricsAggregator(now=0.0)
    faults = FaultCounts(on_event=agg.observe_fault)
    for event in ("draft_fallback_steps", "draft_fallback_steps", "draft_restarts",
                  "resumed_requests", "failed_requests", "refused_queued_tokens"):
        faults.add(event)
    faults.add("draft_recovery_seconds", 2.5)
    faults.add("target_recovery_seconds", 7.0)
    delta = agg.drain(1.0)
    assert delta.counts.faults == {"draft_fallback_steps": 2, "draft_restarts": 1,
                                   "resumed_requests": 1, "failed_requests": 1,
                                   "refused_queued_tokens": 1, "draft_recovery_seconds": 2.5,
                                   "target_recovery_seconds": 7.0}
    assert delta.recovery == [("draft", 2.5), ("target", 7.0)]   # one histogram sample each
    assert agg.drain(2.0).recovery == [] and faults.counts["draft_fallback_steps"] == 2
    assert {"refused_queued_requests", "refused_queued_tokens", "draft_restarts",
            "target_restarts", "resumed_requests", "failed_requests"} <= set(faults.summary())


def test_buffers_are_bounded_without_a_drain():
    agg = MetricsAggregator()
    for _ in range(10_000):
        agg.observe_step(0.01, 0, [1], [1], [1], 2)
    delta = agg.drain(1.0)
    assert delta.counts.decode_steps == 10_000 and len(delta.step_seconds) <= 4096


def test_latency_and_attainment_helpers():
    assert request_latency(10.0, 10.5, 12.5, 5) == (0.5, pytest.approx(0.5))
    assert request_latency(10.0, 10.5, 10.5, 1) == (0.5, None)
    assert request_latency(10.0, None, 11.0, 0) == (None, None)
    within = SloClass("c", 1.0, 0.1)
    assert attainment_record(within, 0.5, 0.05).attained == 1
    assert attainment_record(within, 0.5, 0.2).attained == 0
    assert attainment_record(within, 0.5, None).attained == 1   # a one-token output has no TPOT
    assert attainment_record(within, 0.5, None).tpot_count == 0


def test_slo_class_is_read_tolerantly():
    class Bare:
        pass

    class WithClass:
        slo_class = "chat"

    assert slo_class_of(Bare()) == "default"
    assert slo_class_of(WithClass()) == "chat"


# -- the hook on a real step loop ------------------------------------------------------------
def _serve(engine, recorder, prompts, params, slo_classes=None, pipeline=False):
    async def execute(plan):
        return run_target(engine.target, run_draft(engine.draft, plan))

    classes = slo_classes or [None] * len(prompts)

    async def main():
        serving = AsyncSpecEngine(engine, execute, pipeline=pipeline, on_step=recorder)
        try:
            return await asyncio.gather(*(serving.generate(p, params, slo_class=c)
                                          for p, c in zip(prompts, classes)))
        finally:
            await serving.stop()

    return asyncio.run(main())


@pytest.mark.parametrize("pipeline", [False, True])
def test_hook_counts_match_the_engine(pair, pipeline):
    engine = make_engine(*pair, k=4, max_seqs=4)
    recorder = StepRecorder(engine=engine)
    prompts = random_prompts(6, seed=3)
    results = _serve(engine, recorder, prompts, GREEDY, pipeline=pipeline)
    totals = recorder.aggregator.drain(1.0).counts
    spec = engine.totals
    assert totals.num_draft_tokens == spec.num_draft_tokens > 0
    assert totals.num_accepted_tokens == spec.num_accepted_tokens > 0
    assert sum(totals.accepted_per_pos) == totals.num_accepted_tokens
    assert totals.decode_rows == spec.num_steps and totals.admitted == len(prompts)
    assert totals.finished == len(prompts)
    assert totals.num_emitted_tokens + len(prompts) == sum(r["completion_tokens"] for r in results)
    assert sum(r["speculation"]["num_accepted_tokens"] for r in results) == totals.num_accepted_tokens
    assert totals.predicted_steps == 0                      # static k: no cost model


def test_hook_records_latency_and_predictions_with_a_cost_model(pair):
    engine = make_engine(*pair, k=3, max_seqs=4)
    engine.cost_model = CostModel((0.01, 1e-4, 1e-5, 1e-8), (1e-4, 1e-4, 1e-5, 1e-9))
    recorder = StepRecorder(engine=engine)
    _serve(engine, recorder, random_prompts(3, seed=5), SamplingParams(max_tokens=12, ignore_eos=True))
    delta = recorder.aggregator.drain(1.0)
    d = delta.counts
    assert len(delta.ttft) == 3 and len(delta.tpot) == 3
    assert all(c == engine.slo.default and s >= 0 for c, s in delta.ttft)
    assert d.slo == {}                                      # no SLO budgets: no attainment
    assert 0 < d.predicted_steps <= d.decode_steps
    assert d.predicted_seconds > 0 and d.expected_tokens >= d.predicted_steps


def test_a_failing_hook_never_fails_a_request(pair, caplog):
    engine = make_engine(*pair, k=2, max_seqs=2)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("boom")

    results = _serve(engine, broken, random_prompts(2, seed=9), SamplingParams(max_tokens=6, ignore_eos=True))
    assert [r["completion_tokens"] for r in results] == [6, 6]
    assert len(calls) > 1
    assert sum("on_step hook failed" in r.message for r in caplog.records) == 1


def test_slo_attainment_per_class_matches_the_engine(pair):
    engine = make_engine(*pair, k=2, max_seqs=4)
    engine.slo = SloConfig(classes=[{"name": "tight", "ttft_s": 1e-6, "tpot_s": 1e-6},
                                    {"name": "loose", "ttft_s": 600.0, "tpot_s": 600.0}])
    recorder = StepRecorder(engine=engine)
    _serve(engine, recorder, random_prompts(4, seed=8), SamplingParams(max_tokens=6, ignore_eos=True),
           slo_classes=["tight", "loose", "loose", None])
    delta = recorder.aggregator.drain(1.0)
    # Budgets no step can meet vs budgets no step can miss; best-effort is not counted.
    assert {n: (c.requests, c.attained) for n, c in delta.counts.slo.items()} == \
        {"tight": (1, 0), "loose": (2, 2)}
    assert sorted(c for c, _ in delta.ttft) == ["best-effort", "loose", "loose", "tight"]
    tracked = engine.slo_tracker.per_class
    assert tracked["loose"].attained == 2 and tracked["tight"].attained == 0
