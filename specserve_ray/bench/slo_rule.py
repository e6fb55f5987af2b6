"""The sweep's SLO rule (pure): TTFT and TPOT budgets in ms, fixed for a whole sweep.

- TPOT = S x the single-stream time per output token of plain decoding (or set directly).
- TTFT either one budget for every request (S x the single-stream TTFT at the workload's
  median prompt; or set directly) or, the default, per request: S x the single-stream TTFT
  at that request's own prompt length, from a curve measured at lengths spanning the mix.
- A request's outcome is (ttft_s, tpot_s[, prompt_tokens]) or None when it failed; it meets
  the SLO when it completed, its TTFT is within its budget and its TPOT too (a one-token
  output has no TPOT and is judged by TTFT alone, as vLLM does).
- The server-side class a sweep sends so the SLO-aware policy knows the budgets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BENCH_SLO_CLASS = "bench"


@dataclass(frozen=True)
class SloRule:
    """One SLO of the sweep, in milliseconds; `scale` is S (None when set directly).

    `ttft_curve` holds the per-prompt TTFT rule: (prompt tokens, budget ms) points, already
    scaled by S; a request's TTFT budget is the curve at its prompt length (linear between
    points, flat below the first, the last segment's slope above the last). Empty: one TTFT
    budget for every request, `ttft_ms`. With a curve, `ttft_ms` is the budget at the
    workload's median prompt (the headline figure)."""
    ttft_ms: float
    tpot_ms: float
    scale: float | None
    ttft_curve: tuple[tuple[float, float], ...] = ()

    def ttft_budget_ms(self, prompt_tokens: int | None) -> float:
        if not self.ttft_curve:
            return self.ttft_ms
        if prompt_tokens is None:
            raise ValueError("the per-prompt TTFT rule needs each request's prompt length "
                             "(samples of [ttft_s, tpot_s, prompt_tokens])")
        return curve_at(self.ttft_curve, prompt_tokens)

    def meets(self, ttft_s: float, tpot_s: float | None,
              prompt_tokens: int | None = None) -> bool:
        # A one-token output has no TPOT; it is judged by TTFT alone (as vLLM does).
        return (ttft_s * 1e3 <= self.ttft_budget_ms(prompt_tokens)
                and (tpot_s is None or tpot_s * 1e3 <= self.tpot_ms))

    def as_json(self) -> dict:
        out = {"slo_scale": self.scale, "ttft_ms": round(self.ttft_ms, 3),
               "tpot_ms": round(self.tpot_ms, 3)}
        if self.ttft_curve:
            out["ttft_ms_by_prompt_tokens"] = curve_json(self.ttft_curve)
        return out


def curve_json(curve) -> list:
    return [[int(p), round(float(ms), 3)] for p, ms in curve]


def curve_from_json(points) -> tuple[tuple[float, float], ...]:
    return tuple((float(p), float(ms)) for p, ms in points or ())


def monotone_curve(points) -> tuple[tuple[float, float], ...]:
    """(length, value) points sorted by length, one per length (the median of repeats), made
    non-decreasing (a longer prompt never gets a smaller budget: measurement noise aside,
    prefill time only grows with the prompt)."""
    by_len: dict[float, list[float]] = {}
    for p, v in points:
        by_len.setdefault(float(p), []).append(float(v))
    out, top = [], -math.inf
    for p in sorted(by_len):
        top = max(top, float(np.median(by_len[p])))
        out.append((p, top))
    if not out:
        raise ValueError("a TTFT curve needs at least one measured point")
    return tuple(out)


def curve_at(curve, x: float) -> float:
    xs = [p for p, _ in curve]
    ys = [v for _, v in curve]
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + max(0.0, slope) * (x - xs[-1])
    return float(np.interp(x, xs, ys))


def linear_fit(curve) -> tuple[float, float]:
    """(intercept, slope >= 0) of the least-squares line through (length, value) points:
    the per-prompt TTFT rule as a server-side SLO class can carry it (ttft_s +
    ttft_per_prompt_token_s x prompt tokens). The intercept stays positive."""
    xs = np.array([p for p, _ in curve], dtype=float)
    ys = np.array([v for _, v in curve], dtype=float)
    if len(xs) < 2 or np.ptp(xs) == 0:
        return float(ys.max()), 0.0
    slope = max(0.0, float(np.polyfit(xs, ys, 1)[0]))
    intercept = float(ys.mean() - slope * xs.mean())
    return max(intercept, 0.05 * float(ys.min()), 1e-6), slope


SLO_RULE_TEXT = ("TTFT SLO = S x the single-stream median TTFT of plain decoding (policy "
                 "none) and TPOT SLO = S x its single-stream median time per output token, "
                 "measured once per regime and workload at the workload's median prompt "
                 "length, in ms, fixed for the whole sweep; or both set directly")

SLO_RULE_TEXT_PER_PROMPT = (
    "TTFT SLO per request = S x the single-stream TTFT of plain decoding (policy none) at "
    "that request's prompt length (measured once per regime and workload at prompt lengths "
    "spanning the workload's mix, the median of 3 requests each, linear between them; "
    "written as ttft_ms_by_prompt_tokens, budgets in ms) and TPOT SLO = S x the "
    "single-stream median time per output token at the workload's median prompt, fixed for "
    "the whole sweep; or set directly")


def slo_rules(single_ttft_s: float, single_tpot_s: float, scales: list[float],
              ttft_ms: float | None = None, tpot_ms: float | None = None,
              ttft_curve_s=None) -> list[SloRule]:
    """The rule above; budgets given directly override the derived ones (then S is None
    for the budget(s) set, and a single rule is returned when both are set).
    `ttft_curve_s`: (prompt tokens, single-stream TTFT s) points for the per-prompt rule."""
    if ttft_ms is not None and tpot_ms is not None:
        return [SloRule(float(ttft_ms), float(tpot_ms), None)]
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"SLO scales must be > 0, got {scales}")
    if not (single_ttft_s > 0 and single_tpot_s > 0):
        raise ValueError("single-stream TTFT and TPOT must be > 0 to derive SLOs")
    base = monotone_curve(ttft_curve_s) if ttft_curve_s and ttft_ms is None else ()
    return [SloRule(ttft_ms if ttft_ms is not None else s * single_ttft_s * 1e3,
                    tpot_ms if tpot_ms is not None else s * single_tpot_s * 1e3, s,
                    tuple((p, s * v * 1e3) for p, v in base))
            for s in scales]


def met(outcomes: list, rule: SloRule) -> np.ndarray:
    """bool[n]: which requests met both budgets (a failed request meets none). An outcome
    is (ttft_s, tpot_s) or (ttft_s, tpot_s, prompt_tokens), or None when it failed."""
    out = np.zeros(len(outcomes), dtype=bool)
    for i, o in enumerate(outcomes):
        if o is None:
            continue
        out[i] = rule.meets(o[0], o[1], o[2] if len(o) > 2 else None)
    return out


def bench_slo_class(rule: SloRule) -> dict:
    """The server-side SLO class for a rule. Under the per-prompt TTFT rule the class's TTFT
    budget grows with the prompt too (ttft_s + ttft_per_prompt_token_s x prompt tokens, the
    least-squares line through the rule's curve), so the server does not call a long prompt
    late that the benchmark would not: admission order and the prompt rule
    (yield_to_prompts) see the deadlines the benchmark judges by, to within the line's fit."""
    cls = {"name": BENCH_SLO_CLASS, "ttft_s": rule.ttft_ms / 1e3, "tpot_s": rule.tpot_ms / 1e3}
    if rule.ttft_curve:
        base_ms, per_token_ms = linear_fit(rule.ttft_curve)
        cls.update(ttft_s=base_ms / 1e3, ttft_per_prompt_token_s=per_token_ms / 1e3)
    return cls
