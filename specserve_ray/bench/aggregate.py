"""From a sweep's `runs` and per-request `samples` to its conclusions (pure).

- `max_rate_at_90`: per (regime, workload, drafter, slo_scale, policy), the highest request
  rate with >= 90% SLO attainment, with a bootstrap CI (stats.max_rate_at; every CI here
  resamples repetitions, where a rate has several, and then requests within them);
- `paired`: at every rate, each policy against a reference policy on the same requests: the
  mean paired difference of SLO attainment (and of TPOT in ms) with its 95% CI;
- `curves`: attainment and goodput per rate with 95% CIs, for the plots' bands;
- the markdown tables.
Every figure is recomputed from the per-request samples, so a report can be re-aggregated
(e.g. at another SLO) without re-running anything.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from specserve_ray.bench import slo_rule as sr
from specserve_ray.bench import stats as st
from specserve_ray.bench.report import _fmt

CELL_KEYS = ("regime", "workload", "drafter", "slo_scale")


def _cell(run: dict) -> tuple:
    return tuple(run.get(k) for k in CELL_KEYS)


def _rule(run: dict) -> sr.SloRule:
    return sr.SloRule(run["slo_ttft_s"] * 1e3, run["slo_tpot_s"] * 1e3, run.get("slo_scale"),
                      sr.curve_from_json(run.get("slo_ttft_curve_ms")))


def _outcomes(samples: dict, run: dict) -> list:
    """(ttft_s, tpot_s, prompt_tokens | None) per request; older reports kept no length."""
    return [None if o is None else (o[0], o[1], o[2] if len(o) > 2 else None)
            for o in samples[run["run_id"]]]


def max_rates(runs: list[dict], samples: dict, target: float = 0.9, n_boot: int = 1000,
              seed: int = 0) -> list[dict]:
    groups: dict[tuple, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[_cell(r) + (r["policy"],)][r["rate_req_s"]].append(
            sr.met(_outcomes(samples, r), _rule(r)))
    out = []
    for key, per_rate in groups.items():
        res = st.max_rate_at(per_rate, target, n_boot, seed)
        out.append({**dict(zip(CELL_KEYS, key[:-1])), "policy": key[-1],
                    "rate_req_s": round(res["rate_req_s"], 4),
                    "ci95": [round(x, 4) for x in res["ci95"]], "bound": res["bound"],
                    "attainment_target": target,
                    "attainment_by_rate": {f"{k:g}": round(v, 4)
                                           for k, v in res["attainment_by_rate"].items()}})
    return out


def paired(runs: list[dict], samples: dict, reference: str, n_boot: int = 2000,
           seed: int = 0) -> list[dict]:
    """reference - policy, request by request, pooled over repetitions at each rate."""
    by_point: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        by_point[_cell(r) + (r["rate_req_s"],)][r["policy"]][r["repetition"]] = r
    out = []
    for point, per_policy in by_point.items():
        ref = per_policy.get(reference)
        if ref is None:
            continue
        for policy, reps in per_policy.items():
            if policy == reference:
                continue
            common = sorted(set(ref) & set(reps))
            if not common:
                continue
            a_met, b_met, a_tpot, b_tpot = [], [], [], []     # one entry per repetition
            for rep in common:
                ra, rb = ref[rep], reps[rep]
                oa, ob = _outcomes(samples, ra), _outcomes(samples, rb)
                if len(oa) != len(ob):
                    raise ValueError(f"unpaired request sets at {point}, repetition {rep}")
                a_met.append(sr.met(oa, _rule(ra)).astype(float))
                b_met.append(sr.met(ob, _rule(rb)).astype(float))
                a_tpot.append([np.nan if o is None or o[1] is None else o[1] * 1e3 for o in oa])
                b_tpot.append([np.nan if o is None or o[1] is None else o[1] * 1e3 for o in ob])
            att = st.paired_difference_by_repetition(a_met, b_met, n_boot, seed)
            tpot = st.paired_difference_by_repetition(a_tpot, b_tpot, n_boot, seed)
            out.append({**dict(zip(CELL_KEYS, point[:-1])), "rate_req_s": point[-1],
                        "reference": reference, "policy": policy, "repetitions": len(common),
                        "attainment_diff": att, "tpot_ms_diff": tpot})
    return out


def curves(runs: list[dict], samples: dict, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per (cell, policy, rate): attainment and goodput, pooled over repetitions, 95% CIs."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[_cell(r) + (r["policy"], r["rate_req_s"])].append(r)
    out = []
    for key, rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        per_rep = [sr.met(_outcomes(samples, r), _rule(r)) for r in rs]
        flags = np.concatenate(per_rep)
        # Goodput pools repetitions as requests meeting the SLO per second of run time.
        duration = sum(r["duration_s"] for r in rs)
        att_ci = st.repetitions_mean_ci([f.astype(float) for f in per_rep], n_boot, seed)
        gp_ci = tuple(x * flags.size / duration for x in att_ci)
        out.append({**dict(zip(CELL_KEYS, key[:-2])), "policy": key[-2], "rate_req_s": key[-1],
                    "repetitions": len(rs), "attainment": float(flags.mean()),
                    "attainment_ci95": list(att_ci), "goodput_req_s": flags.sum() / duration,
                    "goodput_ci95": list(gp_ci),
                    "output_tok_s": float(np.mean([r["output_tok_s"] for r in rs]))})
    return out


def deciding_rates(attainment: dict[str, dict[float, float]], target: float = 0.9,
                   limit: int = 2) -> list[float]:
    """The rates that decide the 90% crossing: for each policy the last rate meeting the
    target and the first missing it; the `limit` rates named by most policies."""
    votes: dict[float, int] = defaultdict(int)
    for per_rate in attainment.values():
        rates = sorted(per_rate)
        prev = None
        for r in rates:
            if per_rate[r] < target:
                votes[r] += 1
                if prev is not None:
                    votes[prev] += 1
                break
            prev = r
    ranked = sorted(votes, key=lambda r: (-votes[r], r))
    return sorted(ranked[:limit])


def max_rate_table(rows: list[dict]) -> str:
    head = ("| regime | workload | drafter | S | policy | max rate at >=90% (req/s) | 95% CI "
            "| bound |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=lambda r: (str(r["regime"]), str(r["workload"]),
                                         str(r["drafter"]), str(r["slo_scale"]),
                                         -r["rate_req_s"])):
        lo, hi = r["ci95"]
        lines.append(f"| {r['regime']} | {r['workload']} | {r['drafter']} | "
                     f"{_fmt(r['slo_scale'], 1)} | {r['policy']} | {r['rate_req_s']:.3f} | "
                     f"[{lo:.3f}, {hi:.3f}] | {r['bound']} |")
    return "\n".join(lines)


def curve_table(rows: list[dict]) -> str:
    head = ("| regime | workload | S | rate req/s | policy | reps | attainment [95% CI] | "
            "goodput req/s [95% CI] | out tok/s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=lambda r: (str(r["regime"]), str(r["workload"]),
                                         str(r["slo_scale"]), r["rate_req_s"], r["policy"])):
        a, g = r["attainment_ci95"], r["goodput_ci95"]
        lines.append(f"| {r['regime']} | {r['workload']} | {_fmt(r['slo_scale'], 1)} | "
                     f"{r['rate_req_s']:.3f} | {r['policy']} | {r['repetitions']} | "
                     f"{r['attainment']:.2f} [{a[0]:.2f}, {a[1]:.2f}] | "
                     f"{r['goodput_req_s']:.3f} [{g[0]:.3f}, {g[1]:.3f}] | "
                     f"{r['output_tok_s']:.1f} |")
    return "\n".join(lines)
