"""PNG plots of a sweep (matplotlib, the `bench` extra): per (regime, workload, drafter, SLO
scale), SLO attainment and goodput against the request rate, one line per policy with its
95% confidence band (bootstrap over requests, repetitions pooled), the attainment target
drawn; and the TPOT CDF per policy at each rate (first repetition)."""
from __future__ import annotations

import os
import re


def _ordered(values):
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(str(p) for p in parts)).strip("-")


def write_plots(curves: list[dict], runs: list[dict], out_dir: str,
                target: float = 0.9) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")   # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'specserve-ray[bench]'): no plots")
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    cells = _ordered((c["regime"], c["workload"], c["drafter"], c["slo_scale"]) for c in curves)
    for regime, workload, drafter, scale in cells:
        cc = [c for c in curves if (c["regime"], c["workload"], c["drafter"],
                                    c["slo_scale"]) == (regime, workload, drafter, scale)]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for policy in _ordered(c["policy"] for c in cc):
            pts = sorted((c for c in cc if c["policy"] == policy), key=lambda c: c["rate_req_s"])
            xs = [c["rate_req_s"] for c in pts]
            style = {"linewidth": 2.6, "marker": "o"} if policy == "specserve" else {"marker": "."}
            for ax, key in ((axes[0], "attainment"), (axes[1], "goodput_req_s")):
                line, = ax.plot(xs, [c[key] for c in pts], label=policy, **style)
                ci = "attainment_ci95" if key == "attainment" else "goodput_ci95"
                ax.fill_between(xs, [c[ci][0] for c in pts], [c[ci][1] for c in pts],
                                color=line.get_color(), alpha=0.15)
        axes[0].axhline(target, color="red", linestyle="--", alpha=0.5,
                        label=f"{target:.0%} target")
        axes[0].set_ylim(-0.02, 1.02)
        axes[0].legend(fontsize=8, loc="lower left")
        for ax, title in ((axes[0], "SLO attainment (95% CI)"),
                          (axes[1], "goodput, req/s meeting both SLOs (95% CI)")):
            ax.set_xlabel("request rate (req/s)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{regime}, {workload}, drafter {drafter}, SLO scale S = {scale}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"goodput_{_slug(regime, workload, drafter, scale)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        rr = [r for r in runs if (r["regime"], r["workload"], r["drafter"], r["slo_scale"])
              == (regime, workload, drafter, scale) and r["repetition"] == 0]
        rates = sorted({r["rate_req_s"] for r in rr})
        if not rates:
            continue
        fig, axes = plt.subplots(1, len(rates), figsize=(4.2 * len(rates), 3.8), squeeze=False)
        for ax, rate in zip(axes[0], rates):
            slo = None
            for r in (r for r in rr if r["rate_req_s"] == rate):
                if not r.get("tpot_samples_s"):
                    continue
                xs = [t * 1000 for t in r["tpot_samples_s"]]
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=r["policy"],
                        linewidth=2.4 if r["policy"] == "specserve" else 1.2)
                slo = r["slo_tpot_s"]
            if slo:
                ax.axvline(slo * 1000, color="red", linestyle="--", alpha=0.6, label="TPOT SLO")
            ax.set_title(f"{rate:.2f} req/s", fontsize=10)
            ax.set_xlabel("TPOT (ms)")
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"TPOT CDF per policy: {regime}, {workload}, S = {scale}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"tpot_cdf_{_slug(regime, workload, drafter, scale)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
