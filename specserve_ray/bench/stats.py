"""The sweep's statistics (pure: numbers in, numbers out; no Ray, no HTTP).

- Per-request outcomes: which met the SLO is slo_rule.py's; here they are 0/1 arrays.
- Paired differences: every policy runs the same request set (same prompts, lengths and
  arrival times), so policy A vs B is compared request by request; the 95% CI of the mean
  paired difference comes from a bootstrap over the pairs.
- The maximum rate at >= 90% attainment (DistServe's goodput): the attainment-vs-rate curve
  crosses the target between the last rate that meets it and the first that does not; linear
  interpolation between the two; its CI from a bootstrap over requests at every rate.
"""
from __future__ import annotations

import math

import numpy as np


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
