"""Compare `bench sweep` reports of two code versions run on the same request sets.

An A/B of a change to the server: run the same sweep command (same seed, rates from one
calibration via --calibration-from) against each version, alternating (A B B A), then

    python scripts/compare_sweeps.py --ab old=/tmp/ab/old1.json,/tmp/ab/old2.json \\
        --ab new=/tmp/ab/new1.json,/tmp/ab/new2.json --reference new

Each policy becomes "policy@label"; the files of one label are its repetitions. Printed:
per rate and SLO scale, attainment (95% CI, repetitions pooled), TTFT / TPOT medians, and
each policy@label against the reference label's same policy, request by request (mean
paired difference of attainment with a 95% bootstrap CI). A policy the change should not
touch (e.g. a static k) is the control: its difference shows the drift between runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import numpy as np

from specserve_ray.bench import aggregate as agg


def merged(ab: list[tuple[str, list[str]]]) -> tuple[list[dict], dict]:
    runs, samples = [], {}
    for label, paths in ab:
        for rep, path in enumerate(paths):
            with open(path) as f:
                report = json.load(f)
            for r in report["runs"]:
                run_id = f"{r['run_id']}@{label}#{rep}"
                samples[run_id] = report["samples"][r["run_id"]]
                runs.append({**r, "policy": f"{r['policy']}@{label}", "repetition": rep,
                             "run_id": run_id})
    return runs, samples


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ab", action="append", required=True, metavar="LABEL=PATH[,PATH...]")
    p.add_argument("--reference", required=True, help="the label the others are compared to")
    p.add_argument("--json", help="write the comparison here")
    args = p.parse_args(argv)
    ab = []
    for item in args.ab:
        label, _, paths = item.partition("=")
        ab.append((label, paths.split(",")))
    runs, samples = merged(ab)
    out = {"curves": agg.curves(runs, samples), "paired": []}
    policies = sorted({r["policy"].rsplit("@", 1)[0] for r in runs})
    for base in policies:
        ref = f"{base}@{args.reference}"
        sub = [r for r in runs if r["policy"].rsplit("@", 1)[0] == base]
        if any(r["policy"] == ref for r in sub):
            # Repetitions pair by index: rep i of one label against rep i of the other.
            out["paired"] += agg.paired(sub, samples, ref)
    print(agg.curve_table(out["curves"]))
    medians = defaultdict(lambda: defaultdict(list))
    for r in runs:
        key = (r["rate_req_s"], r["slo_scale"], r["policy"])
        for o in samples[r["run_id"]]:
            if o is not None:
                medians[key]["ttft"].append(o[0])
                if o[1] is not None:
                    medians[key]["tpot"].append(o[1])
    print("\n| rate | S | policy | TTFT p50 ms | TPOT p50 ms |\n|---|---|---|---|---|")
    first_scale = min(r["slo_scale"] for r in runs)    # the medians do not depend on S
    for (rate, scale, policy), m in sorted(medians.items()):
        if scale == first_scale and m["ttft"]:
            tpot = f"{statistics.median(m['tpot']) * 1e3:.1f}" if m["tpot"] else "-"
            print(f"| {rate:.2f} | {scale:g} | {policy} | "
                  f"{statistics.median(m['ttft']) * 1e3:.0f} | {tpot} |")
    print("\n| rate | S | reference | other | attainment ref - other [95% CI] | TPOT ms ref - other |"
          "\n|---|---|---|---|---|---|")
    for row in sorted(out["paired"], key=lambda r: (r["rate_req_s"], r["slo_scale"],
                                                     r["policy"])):
        a, t = row["attainment_diff"], row["tpot_ms_diff"]
        print(f"| {row['rate_req_s']:.2f} | {row['slo_scale']:g} | {row['reference']} | "
              f"{row['policy']} | {a['mean_diff']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}]"
              f" | {t['mean_diff']:+.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=lambda o: o.tolist() if isinstance(
                o, np.ndarray) else str(o))


if __name__ == "__main__":
    main()
