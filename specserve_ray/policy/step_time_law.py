"""How a step's seconds grow with its tokens, learned from the steps the engine runs (pure).

    seconds ~= fixed_s + token_s * tokens

A step pays a fixed part whatever it carries (the draft loop, dispatch, the router's plan
and apply, the transport) and a part per token scored (decode rows' verified tokens and
prompt chunks alike). The TPOT-room budget (prefill_share.tpot_step_budget) asks how many
tokens fit in the seconds the decode rows can wait; with the mean seconds per token (fixed
part spread over the tokens) a small decode step looks several times dearer per token than
a prompt chunk really is, so the budget hardly grew where it could: at light load a batch
of one drafting row makes 5-token steps whose fixed part is most of their time.

A weighted least-squares line over recent steps (exponential forgetting, so the law follows
the load and the policy), trusted once the steps it saw differ enough in size to tell the
two parts apart; until then `law()` returns None and the caller keeps the mean.
"""
from __future__ import annotations

import math


class StepTimeLaw:
    def __init__(self, forget: float = 0.98, min_steps: int = 8, min_spread_tokens: float = 8.0):
        self.forget = forget                    # weight of a step k steps ago: forget ** k
        self.min_steps = min_steps
        self.min_spread = min_spread_tokens     # weighted s.d. of step sizes needed to fit
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.steps = 0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        f, x, y = self.forget, float(tokens), float(seconds)
        self._w = f * self._w + 1.0
        self._x = f * self._x + x
        self._y = f * self._y + y
        self._xx = f * self._xx + x * x
        self._xy = f * self._xy + x * y
        self.steps += 1

    def law(self) -> tuple[float, float] | None:
        """(fixed_s, token_s), or None while the steps seen cannot separate them."""
        if self.steps < self.min_steps or self._w <= 0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var < self.min_spread ** 2:
            return None
        slope = (self._xy / self._w - mx * my) / var
        if not slope > 0:
            return None
        # A negative intercept is noise around a small fixed part; never above the mean step.
        fixed = min(max(my - slope * mx, 0.0), my)
        return fixed, slope
