"""PNG plots of a trace sweep (matplotlib, the `bench` extra): per regime, goodput and SLO
attainment against load (one line per policy) and the TPOT CDF per policy at each load."""
from __future__ import annotations

import os


def _policies(runs):
    seen = []
    for r in runs:
        if r["policy"] not in seen:
            seen.append(r["policy"])
    return seen


def write_plots(runs: list[dict], out_dir: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")   # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'specserve-ray[bench]'): no plots")
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for regime in sorted({r["regime"] for r in runs}):
        rr = [r for r in runs if r["regime"] == regime]
        policies = _policies(rr)
        loads = []
        for r in rr:
            if r["load"] not in loads:
                loads.append(r["load"])
        rate = {l: next(r["request_rate"] for r in rr if r["load"] == l) for l in loads}

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for policy in policies:
            pts = sorted(((rate[r["load"]], r) for r in rr if r["policy"] == policy),
                         key=lambda t: t[0])
            xs = [x for x, _ in pts]
            style = {"linewidth": 2.6, "marker": "o"} if policy == "specserve" else {"marker": "."}
            axes[0].plot(xs, [r["goodput_req_s"] for _, r in pts], label=policy, **style)
            axes[1].plot(xs, [r["slo_attainment"] for _, r in pts], label=policy, **style)
        for ax, title in ((axes[0], "goodput (req/s meeting TTFT and TPOT SLOs)"),
                          (axes[1], "SLO attainment")):
            ax.set_xlabel("offered load (req/s)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            for l in loads:
                ax.axvline(rate[l], color="grey", alpha=0.15)
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].legend(fontsize=8, loc="lower left")
        fig.suptitle(f"SpecServe-Ray trace sweep, regime {regime}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"goodput_{regime}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(1, len(loads), figsize=(4.2 * len(loads), 3.8), squeeze=False)
        for ax, load in zip(axes[0], loads):
            slo = None
            for policy in policies:
                r = next((r for r in rr if r["policy"] == policy and r["load"] == load), None)
                if r is None or not r["tpot_samples_s"]:
                    continue
                xs = [t * 1000 for t in r["tpot_samples_s"]]
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=policy,
                        linewidth=2.4 if policy == "specserve" else 1.2)
                slo = r["slo_tpot_s"]
            if slo:
                ax.axvline(slo * 1000, color="red", linestyle="--", alpha=0.6, label="TPOT SLO")
            ax.set_title(f"{load} ({rate[load]:.2f} req/s)", fontsize=10)
            ax.set_xlabel("TPOT (ms)")
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"TPOT CDF per policy, regime {regime}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"tpot_cdf_{regime}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
