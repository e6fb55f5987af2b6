"""Per-run metrics (pure): latency percentiles, throughput, SLO goodput, server-side deltas.

Definitions follow vLLM's benchmark_serving: TTFT = send -> first token; TPOT = (last -
first token) / (output tokens - 1); ITL = gaps between streamed chunks; E2E = send -> last
token; goodput = requests per second meeting every SLO (its --goodput); the duration runs
from the first send to the last completion. A failed request meets no SLO.
"""
from __future__ import annotations

import numpy as np

from specserve_ray.bench.loadgen import RequestRecord
from specserve_ray.bench.slo_rule import SloRule, curve_json

PERCENTILES = (50, 90, 99)

def latency_summary(values: list[float]) -> dict:
    """mean / p50 / p90 / p99 in seconds (None when there is nothing to summarise)."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float)
    out = {"mean": float(arr.mean())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
    return out


def meets_slo(rec: RequestRecord, slo: SloRule) -> bool:
    return rec.ok and slo.meets(rec.ttft, rec.tpot, rec.input_tokens)


STEP_SPLIT_KEYS = ("draft", "verify", "prefill", "overhead", "plan", "apply", "loop_wait",
                   "transport", "worker_busy")


def server_delta(before: dict | None, after: dict | None) -> dict:
    """What the router did during the run, from two /v1/stats snapshots."""
    if not before or not after:
        return {}
    sb, sa = before.get("speculation", {}), after.get("speculation", {})
    steps = sa.get("num_steps", 0) - sb.get("num_steps", 0)
    accepted = sa.get("num_accepted_tokens", 0) - sb.get("num_accepted_tokens", 0)
    drafted = sa.get("num_draft_tokens", 0) - sb.get("num_draft_tokens", 0)
    out = {"verify_rows": steps, "draft_tokens": drafted, "accepted_tokens": accepted,
           "mean_acceptance_length": (1.0 + accepted / steps) if steps else None,
           "acceptance_rate": (accepted / drafted) if drafted else None}
    # Draft tokens per drafter ('model', 'ngram'): which proposer the run really used.
    pb, pa = sb.get("per_drafter", {}), sa.get("per_drafter", {})
    if pa:
        out["draft_tokens_by_drafter"] = {
            name: s.get("num_draft_tokens", 0) - pb.get(name, {}).get("num_draft_tokens", 0)
            for name, s in sorted(pa.items())}
    tb, ta = before.get("step_time_s", {}), after.get("step_time_s", {})
    n = ta.get("steps", 0) - tb.get("steps", 0)
    if n:
        out["decode_steps"] = n
        out["mean_batch_size"] = (ta.get("rows", 0) - tb.get("rows", 0)) / n
        out["mean_step_s"] = (ta.get("total", 0.0) - tb.get("total", 0.0)) / n
        # Where a step's time went (seconds per step): the forwards, the router's planning
        # and applying, Ray transport; so two policies' step times can be told apart.
        out["step_split_s"] = {key: (ta[key] - tb.get(key, 0.0)) / n for key in STEP_SPLIT_KEYS
                               if key in ta}
    if "prefill_capped_steps" in after:
        out["prefill_capped_steps"] = (after["prefill_capped_steps"]
                                       - (before.get("prefill_capped_steps") or 0))
    # Chosen-k histogram (cumulative counts per k since the server started).
    kb, ka = before.get("chosen_k_counts"), after.get("chosen_k_counts")
    if ka is not None:
        kb = list(kb or []) + [0] * (len(ka) - len(kb or []))
        counts = [a - b for a, b in zip(ka, kb)]
        total = sum(counts)
        out["chosen_k_counts"] = counts
        out["chosen_k_dist"] = [c / total for c in counts] if total else []
        out["mean_chosen_k"] = (sum(k * c for k, c in enumerate(counts)) / total) if total else None
    return out


def run_metrics(records: list[RequestRecord], duration_s: float, slo: SloRule) -> dict:
    ok = [r for r in records if r.ok]
    good = sum(meets_slo(r, slo) for r in records)
    out_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    samples: list[str] = []     # a few full messages, so a failure can be diagnosed
    for r in records:
        if not r.ok:
            kind = (r.error or "unknown").split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
            if r.error not in samples and len(samples) < 3:
                samples.append(r.error)
    m = {"num_requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
         "errors": errors, "error_samples": samples, "duration_s": duration_s,
         "request_throughput": len(ok) / duration_s,
         "output_tok_s": out_tokens / duration_s,
         "goodput_req_s": good / duration_s,
         "slo_attainment": good / len(records) if records else None,
         "slo_ttft_s": slo.ttft_ms / 1e3, "slo_tpot_s": slo.tpot_ms / 1e3}
    if slo.ttft_curve:      # the per-prompt TTFT rule: the budget at each prompt length
        m["slo_ttft_curve_ms"] = curve_json(slo.ttft_curve)
    series = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
              "itl": [g for r in ok for g in r.itls], "e2e": [r.e2e for r in ok]}
    for name, values in series.items():
        for stat, v in latency_summary(values).items():
            m[f"{name}_{stat}_s"] = v
    return m


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


TABLE_COLUMNS = [("regime", "regime"), ("workload", "workload"), ("slo_scale", "S"),
                 ("repetition", "rep"), ("load", "load"), ("policy", "policy"),
                 ("request_rate", "req/s in"), ("goodput_req_s", "goodput req/s"),
                 ("slo_attainment", "SLO att."), ("output_tok_s", "out tok/s"),
                 ("ttft_p50_s", "TTFT p50 s"), ("ttft_p99_s", "TTFT p99 s"),
                 ("tpot_p50_s", "TPOT p50 s"), ("tpot_p99_s", "TPOT p99 s"),
                 ("mean_acceptance_length", "accept len"), ("mean_chosen_k", "mean k"),
                 ("failed", "failed")]


def markdown_table(runs: list[dict]) -> str:
    head = "| " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [head, sep]
    for r in runs:
        lines.append("| " + " | ".join(_fmt(r.get(key)) for key, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


# Keys every entry of `runs` carries (the JSON contract; tests check it).
RUN_KEYS = ("regime", "policy", "load", "load_fraction", "request_rate", "arrival",
            "synthetic_acceptance_rate", "goodput_req_s", "slo_attainment", "output_tok_s",
            "ttft_p50_s", "tpot_p50_s", "tpot_p99_s", "itl_p50_s", "e2e_p50_s",
            "mean_acceptance_length", "chosen_k_dist", "failed",
            # The sweep's dimensions (issue 11): one entry per policy, rate, workload,
            # regime, drafter, repetition and SLO scale.
            "workload", "drafter", "repetition", "slo_scale", "rate_req_s", "run_id")


def run_entry(regime: str, policy: str, load: str, load_fraction: float | None,
              request_rate: float, arrival: str, synthetic: float | None,
              metrics: dict, server: dict, tpots: list[float], *, workload: str,
              drafter: str, repetition: int, slo_scale: float | None, rate_req_s: float,
              run_id: str) -> dict:
    entry = {"regime": regime, "policy": policy, "load": load, "load_fraction": load_fraction,
             "workload": workload, "drafter": drafter, "repetition": repetition,
             "slo_scale": slo_scale, "rate_req_s": rate_req_s, "run_id": run_id,
             "request_rate": request_rate, "arrival": arrival,
             "synthetic_acceptance_rate": synthetic, **metrics,
             "mean_acceptance_length": server.get("mean_acceptance_length"),
             "acceptance_rate": server.get("acceptance_rate"),
             "mean_chosen_k": server.get("mean_chosen_k"),
             "chosen_k_dist": server.get("chosen_k_dist"),
             "server": server,
             # Raw TPOTs (for the CDF plot), rounded to keep the JSON small.
             "tpot_samples_s": [round(t, 5) for t in sorted(tpots)]}
    return entry


def outcomes(records: list[RequestRecord]) -> list:
    """Per request [ttft_s, tpot_s | None, prompt_tokens], or None when it failed (the JSON
    `samples`; the prompt length lets the per-prompt TTFT rule judge it again)."""
    return [[round(r.ttft, 5), None if r.tpot is None else round(r.tpot, 6), r.input_tokens]
            if r.ok else None for r in records]
