"""The step-time law (policy/step_time_law.py) and the TPOT-room budget it feeds
(prefill_share.tpot_step_budget; the scheduler's planning with it in test_prefill_share.py)."""
from __future__ import annotations

import random

import pytest

from specserve_ray.policy.prefill_share import LAW_MARGIN, tpot_step_budget
from specserve_ray.policy.step_time_law import StepTimeLaw


def _fed(sizes, fixed=0.02, per_token=4e-4, law=None, noise=0.0, seed=0):
    law = law or StepTimeLaw()
    rng = random.Random(seed)
    for n in sizes:
        law.observe(n, fixed + per_token * n + rng.gauss(0.0, noise))
    return law


def test_separates_the_fixed_part_from_the_per_token_part():
    law = _fed([5, 5, 5, 64, 5, 5, 200, 5, 5, 37] * 3)
    fixed, per_token = law.law()
    assert fixed == pytest.approx(0.02) and per_token == pytest.approx(4e-4)


def test_noisy_steps_still_give_the_line():
    sizes = random.Random(1).choices([5, 9, 40, 120, 256], k=300)
    law = _fed(sizes, noise=0.002, seed=2)
    fixed, per_token = law.law()
    assert fixed == pytest.approx(0.02, abs=0.003) and per_token == pytest.approx(4e-4, rel=0.1)


@pytest.mark.parametrize("sizes", [[5, 64, 200], [5] * 50, [30, 31, 32] * 10])
def test_no_law_until_steps_differ_enough(sizes):
    assert _fed(sizes).law() is None      # too few steps, or all of about one size


def test_follows_a_change_and_forgets_the_old_law():
    law = _fed([5, 64, 200, 5, 5] * 20)
    law = _fed([5, 64, 200, 5, 5] * 60, fixed=0.01, per_token=8e-4, law=law)
    fixed, per_token = law.law()
    assert fixed == pytest.approx(0.01, abs=1e-3) and per_token == pytest.approx(8e-4, rel=0.05)


def test_never_a_negative_fixed_part_or_slope():
    law = _fed([5, 64, 200, 5] * 5, fixed=-0.01, per_token=4e-4)
    assert law.law()[0] == 0.0
    assert _fed([5, 64, 200, 5] * 5, fixed=0.1, per_token=-1e-4).law() is None
    law = StepTimeLaw()
    law.observe(0, 0.01), law.observe(5, 0.0), law.observe(5, float("nan"))
    assert law.steps == 0


def test_budget_from_the_law_counts_the_fixed_part_once():
    # Room 0.05 + 0.1 s of lead; the fixed 0.02 s is paid once, then 0.5 ms per token.
    assert tpot_step_budget(32, 512, [0.05], [0.1], 5e-4, 0.02) == int(0.13 / 5e-4 * LAW_MARGIN)
    # The mean per token of small steps (the fallback) is dearer: a smaller budget.
    assert tpot_step_budget(32, 512, [0.05], [0.1], 0.025 / 5) == 32
    assert tpot_step_budget(32, 200, [0.05], [0.1], 5e-4, 0.02) == 200        # the ceiling
    assert tpot_step_budget(32, 256, [0.05], [0.0], 5e-4, 0.06) == 32         # no room past fixed
