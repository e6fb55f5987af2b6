"""The sweep's statistics (pure: numbers in, numbers out; no Ray, no HTTP).

- The SLO rule: TTFT and TPOT budgets in ms, S x the single-stream figures of plain
  decoding (or set directly), fixed for a whole sweep; the TTFT budget either one for all
  requests (the median prompt's) or per request, at its own prompt length.
- Per-request outcomes: a request is (ttft_s, tpot_s) or None when it failed; it meets an
  SLO when it completed, its TTFT is within budget and its TPOT too (a one-token output has
  no TPOT and is judged by TTFT alone, as vLLM does).
- Paired differences: every policy runs the same request set (same prompts, lengths and
  arrival times), so policy A vs B is compared request by request; the 95% CI of the mean
  paired difference comes from a bootstrap over the pairs.
- The maximum rate at >= 90% attainment (DistServe's goodput): the attainment-vs-rate curve
  crosses the target between the last rate that meets it and the first that does not; linear
  interpolation between the two; its CI from a bootstrap over requests at every rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np



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


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (float[n])."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (math.nan, math.nan)
    if values.size == 1 or np.all(values == values[0]):
        return (float(values[0]), float(values[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def resample_repetitions(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One bootstrap draw of a sample made of repetitions (one array per pass over the
    same kind of request set): the repetitions with replacement when there are several,
    then the requests within each drawn one. Two passes of one request set can differ
    more than their requests' spread says (a queue forms in one and not the other), so
    resampling requests alone would understate the uncertainty."""
    if len(groups) > 1:
        groups = [groups[i] for i in rng.integers(0, len(groups), len(groups))]
    return np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])


def repetitions_mean_ci(groups: list[np.ndarray], n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """`bootstrap_mean_ci` of the pooled values, resampling repetitions and then values
    within them (`resample_repetitions`); one repetition: `bootstrap_mean_ci` itself."""
    groups = [np.asarray(g, dtype=float) for g in groups if np.asarray(g).size]
    if len(groups) <= 1:
        return bootstrap_mean_ci(groups[0] if groups else np.zeros(0), n_boot, seed, level)
    rng = np.random.default_rng(seed)
    means = [resample_repetitions(groups, rng).mean() for _ in range(n_boot)]
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000,
                      seed: int = 0) -> dict:
    """Mean of a - b over pairs (a[i], b[i] measured on the same request) with its 95% CI.
    Pairs where either side is NaN (e.g. a failed request's TPOT) are dropped."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    return paired_difference_by_repetition([a], [b], n_boot, seed)


def paired_difference_by_repetition(a: list[np.ndarray], b: list[np.ndarray],
                                    n_boot: int = 2000, seed: int = 0) -> dict:
    """`paired_difference` over several repetitions (a[r][i], b[r][i]: request i of
    repetition r), its CI resampling repetitions, then pairs within them."""
    diffs = []
    for ra, rb in zip(a, b):
        ra, rb = np.asarray(ra, dtype=float), np.asarray(rb, dtype=float)
        if ra.shape != rb.shape:
            raise ValueError(f"paired samples differ in shape: {ra.shape} vs {rb.shape}")
        keep = ~(np.isnan(ra) | np.isnan(rb))
        diffs.append(ra[keep] - rb[keep])
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    lo, hi = repetitions_mean_ci(diffs, n_boot, seed)
    return {"mean_diff": float(d.mean()) if d.size else None, "n_pairs": int(d.size),
            "ci95": [lo, hi] if d.size else None,
            "significant": bool(d.size and (lo > 0 or hi < 0))}


def crossing_rate(rates: list[float], attainment: list[float], target: float = 0.9
                  ) -> tuple[float, str]:
    """The highest rate at which attainment >= target on the rising-rate curve.

    Scanning rates upwards, the first rate below target ends the search; between it and the
    previous rate (which met the target) the answer is interpolated linearly. Returns
    (rate, bound): bound "interpolated", "at_or_above_highest" (every rate met it: the
    answer is a lower bound) or "below_lowest" (not even the lowest rate met it: 0.0).
    """
    pts = sorted(zip(rates, attainment))
    if not pts:
        raise ValueError("no points")
    prev = None
    for rate, att in pts:
        if att < target:
            if prev is None:
                return 0.0, "below_lowest"
            r0, a0 = prev
            frac = (a0 - target) / (a0 - att) if a0 != att else 0.0
            return r0 + frac * (rate - r0), "interpolated"
        prev = (rate, att)
    return pts[-1][0], "at_or_above_highest"


def max_rate_at(per_rate: dict[float, list[np.ndarray]], target: float = 0.9,
                n_boot: int = 1000, seed: int = 0) -> dict:
    """The crossing rate of one policy, with a bootstrap CI.

    per_rate: {rate: [bool[n] met-flags of each repetition]}. Attainment at a rate pools its
    repetitions; each bootstrap draw resamples, at every rate, its repetitions (where it
    has several) and then their requests (`resample_repetitions`).
    """
    rates = sorted(per_rate)
    pooled = [np.concatenate(per_rate[r]) if per_rate[r] else np.zeros(0, bool) for r in rates]
    att = [float(p.mean()) if p.size else 0.0 for p in pooled]
    rate, bound = crossing_rate(rates, att, target)
    rng = np.random.default_rng(seed)
    draws = []
    groups = [[g for g in per_rate[r] if g.size] for r in rates]
    for _ in range(n_boot):
        boot_att = [float(resample_repetitions(g, rng).mean()) if g else 0.0 for g in groups]
        draws.append(crossing_rate(rates, boot_att, target)[0])
    lo, hi = (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))
    return {"rate_req_s": rate, "ci95": [lo, hi], "bound": bound,
            "attainment_by_rate": dict(zip([float(r) for r in rates], att))}
