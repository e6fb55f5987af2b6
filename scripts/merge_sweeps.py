"""Merge `bench sweep` reports of one sweep's points into one report, and conclude again.

A sweep's rate list is fixed once it runs (`--resume` keeps it), so a rate added later runs
as its own sweep: the same command with the longer `--loads` list, `--only-loads NEW` and
`--calibration-from FIRST.json` (so the SLOs and capacity are the first sweep's, and every
rate keeps the request set its place in the list gives it). This joins them:

    python scripts/merge_sweeps.py --json merged.json first.json added.json

Refused unless every report has the same calibration, SLOs and SLO rule, and no run is in
two reports. The merged report keeps every run and sample and recomputes `max_rate_at_90`,
`paired` (against specserve when it ran), `curves` and the tables (stats.py, aggregate.py).
"""
from __future__ import annotations

import argparse
import json

from specserve_ray.bench import aggregate as agg
from specserve_ray.bench.report import markdown_table

SAME = ("calibration", "slos", "slo_rule")


def _comparable(cal: dict) -> dict:
    # A later sweep adds the app's max_model_len to each calibration it reuses.
    return {regime: {label: {k: v for k, v in c.items() if k != "max_model_len"}
                     for label, c in cells.items()} for regime, cells in cal.items()}


def merge(reports: list[dict]) -> dict:
    first = reports[0]
    out = {**{k: first.get(k) for k in SAME + ("setup", "client")},
           "merged_from": [], "runs": [], "samples": {}, "errors": [], "partial": False}
    for i, rep in enumerate(reports):
        if rep.get("partial"):
            raise SystemExit(f"report {i} is partial (an unfinished sweep): resume it first")
        for key in SAME:
            a, b = first.get(key), rep.get(key)
            if key == "calibration":
                a, b = _comparable(a or {}), _comparable(b or {})
            if a != b:
                raise SystemExit(f"report {i} differs from the first in {key!r}: not one sweep")
        dup = set(rep["samples"]) & set(out["samples"])
        if dup:
            raise SystemExit(f"report {i} repeats runs of an earlier one: {sorted(dup)[:3]}")
        out["runs"] += rep["runs"]
        out["samples"].update(rep["samples"])
        out["errors"] += rep.get("errors", [])
        out["merged_from"].append({"setup": rep.get("setup"), "elapsed_s": rep.get("elapsed_s"),
                                   "deciding_rates": rep.get("deciding_rates")})
    runs, samples = out["runs"], out["samples"]
    policies = sorted({r["policy"] for r in runs})
    reference = "specserve" if "specserve" in policies else policies[0]
    target = (first.get("setup") or {}).get("attainment_target") or 0.9
    out["max_rate_at_90"] = agg.max_rates(runs, samples, target)
    out["paired"] = agg.paired(runs, samples, reference)
    out["curves"] = agg.curves(runs, samples)
    out["table_markdown"] = agg.curve_table(out["curves"])
    out["max_rate_table_markdown"] = agg.max_rate_table(out["max_rate_at_90"])
    out["runs_table_markdown"] = markdown_table(runs)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+", help="sweep JSONs of one sweep (same calibration)")
    p.add_argument("--json", required=True, help="write the merged report here")
    p.add_argument("--plots-dir", help="also write the plots here")
    args = p.parse_args(argv)
    reports = []
    for path in args.reports:
        with open(path) as f:
            reports.append(json.load(f))
    out = merge(reports)
    if args.plots_dir:
        from specserve_ray.bench.plots import write_plots

        out["plots"] = write_plots(out["curves"], out["runs"], args.plots_dir)
    with open(args.json, "w") as f:
        json.dump(out, f)
    print(out["table_markdown"] + "\n\n" + out["max_rate_table_markdown"])


if __name__ == "__main__":
    main()
