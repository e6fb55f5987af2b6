"""Confidence calibration and the learned per-step overhead (pure, fast)."""
from __future__ import annotations

import numpy as np
import pytest

from specserve_ray.policy import CostModel, record_step, start_drafting
from specserve_ray.policy.calibration import ConfidenceCalibration, apply_table
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy.drafter import should_continue
from specserve_ray.policy import BatchState, SpecServe, StepFeedback


def test_unseen_bins_trust_the_draft():
    cal = ConfidenceCalibration(bins=10)
    assert np.allclose(cal.table(), (np.arange(10) + 0.5) / 10)


def test_learns_an_under_confident_draft():
    """Tokens drafted at p ~ 0.3 that the target accepts 90% of the time."""
    rng = np.random.default_rng(0)
    cal = ConfidenceCalibration(bins=10, decay=1.0)
    for _ in range(300):
        conf = np.full((4, 3), 0.33)
        accepted = np.array([sum(1 for _ in iter(lambda: rng.random() < 0.9, False))
                             for _ in range(4)]).clip(max=3)
        cal.observe(conf, [3, 3, 3, 3], accepted)
    assert cal(np.array([0.33]))[0] == pytest.approx(0.9, abs=0.03)
    # Monotone: nothing above the learned bin maps lower.
    assert all(b >= a for a, b in zip(cal.table(), cal.table()[1:]))


def test_only_tested_tokens_count():
    cal = ConfidenceCalibration(bins=2, prior_weight=1e-9, decay=1.0)
    # Row 0: 3 sent, 1 accepted -> tokens 0 (hit) and 1 (miss) tested, token 2 untested.
    # Row 1: 2 drafted but only 1 sent, accepted -> one tested hit.
    cal.observe(np.array([[0.9, 0.2, 0.2], [0.9, 0.9, 0.0]]), [3, 1], [1, 1])
    assert list(cal.tested) == [1.0, 2.0] and list(cal.accepted) == [0.0, 2.0]


def test_apply_table_bins_and_clips():
    table = (0.1, 0.5, 0.9)
    assert list(apply_table(table, [0.0, 0.34, 0.99, 1.0, 1.7, np.nan])) == \
        [0.1, 0.5, 0.9, 0.9, 0.9, 0.1]


def test_step_overhead_favours_deeper_drafts():
    """With a large fixed per-step cost, drafting deeper pays where it otherwise would not."""
    cost = CostModel((0.01, 0.0, 0.004, 0.0), (0.0005, 0.0012, 0.0, 0.0))
    progress = start_drafting([5])
    depth_without = 0
    while should_continue(progress, 0.6, cost, 100.0).any():
        progress = record_step(progress, np.array([0.6]), np.array([True]))
        depth_without += 1
    cost.observe_step_overhead(0.02, weight=1.0)
    assert cost.step_overhead == pytest.approx(0.02)
    progress = start_drafting([5])
    depth_with = 0
    while should_continue(progress, 0.6, cost, 100.0).any():
        progress = record_step(progress, np.array([0.6]), np.array([True]))
        depth_with += 1
    assert depth_with > depth_without
    # predict_step carries the overhead (the TPOT cap and SmartSpec see it too).
    assert cost.predict_step(1, 0, 100.0) == pytest.approx(0.01 + 0.004 + 0.02)


def test_specserve_learns_calibration_from_feedback():
    cost = CostModel((0.01, 1e-4, 1e-5, 1e-8), (1e-4, 1e-4, 1e-5, 1e-9))
    policy = SpecServe(cost, max_k=4)
    state = BatchState(context_len=(50, 60), k_cap=(4, 4), confidence_ema=(0.3, 0.3))
    decision = policy.decide(state)
    for _ in range(200):   # the engine's learned state, which every policy instance shares
        policy.learned.observe(StepFeedback((3, 3), (3, 3), 0.02, confidences=np.full((2, 3), 0.25)))
    assert policy.calibrate(np.array([0.25]))[0] > 0.9
    control = policy.decide(state).control
    assert control is not None and control.calibration is not None
    assert control.calibrated(np.array([0.25]))[0] > 0.9
    # The threshold rule never calibrates: it is Hugging Face's rule on raw probabilities.
    assert DraftControl(stop="threshold", threshold=0.4).calibrated([0.25])[0] == 0.25
    assert decision.max_k
