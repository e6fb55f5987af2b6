"""The sweep's JSON on disk: what identifies a sweep (its setup), the checkpoint written
after every run, and what `--resume` and `--calibration-from` read back."""
from __future__ import annotations

import json
import os


def checkpoint(args, report: dict) -> None:
    """Write the report so far to --json (atomically): a sweep cut short keeps its runs."""
    if not getattr(args, "json", None):
        return
    tmp = f"{args.json}.tmp"
    with open(tmp, "w") as f:
        json.dump({**report, "partial": True}, f)
    os.replace(tmp, args.json)


# Setup keys that may differ between a sweep and its resumption.
# Free to differ on --resume: where the calibration came from, and which rates run now
# (a resumed sweep may add points of the same rate list).
_RESUME_FREE = ("calibration_from", "run_levels")


def load_resumable(path: str, setup: dict) -> dict:
    """An earlier report of the same sweep (same setup), for --resume."""
    with open(path) as f:
        earlier = json.load(f)
    if "runs" not in earlier or "samples" not in earlier:
        raise SystemExit(f"--resume: {path} is not a sweep report")
    before = {k: v for k, v in earlier.get("setup", {}).items() if k not in _RESUME_FREE}
    now = {k: v for k, v in json.loads(json.dumps(setup)).items() if k not in _RESUME_FREE}
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if differ:
        raise SystemExit(f"--resume: {path} was a different sweep (setup differs in "
                         f"{', '.join(differ)}); run it with the same arguments")
    return earlier


def prior_calibration(path: str | None) -> dict:
    if not path:
        return {}
    with open(path) as f:
        return json.load(f).get("calibration", {})


def sweep_setup(args) -> dict:
    keys = ("workloads", "trace_paths", "url", "dashboard_url", "regimes", "drafter",
            "policies", "max_k", "load_levels", "run_levels", "burstiness", "duration",
            "min_requests", "max_requests", "input_budget", "slo_scales", "ttft_rule",
            "slo_ttft_ms", "slo_tpot_ms", "calibration_from", "attainment_target", "repetitions",
            "deciding_repetitions", "deciding_rates", "warmup_requests", "synthetic_acceptance",
            "capacity_policy", "max_num_seqs", "seed", "quick")
    return {k: getattr(args, k, None) for k in keys}
