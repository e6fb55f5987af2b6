"""Usage: PYTHONPATH=.:kernels python scripts/bench_policy_cpu.py [--batches 1,8]
          [--policies specserve,static:3] [--steps 300] [--rounds 5] [--trace PATH]
          [--tpot-ms MS] [--trees BEFORE,AFTER]

The scheduler's own CPU per decode step (plan_step + apply_step), with no models: the
workers are replaced by synthetic StepResults (seeded acceptances and confidences, step
seconds from a fixed "true" cost law), so what is timed is the scheduler and the policy
alone. The tiny pair's tokenizer does the detokenizing, as in serving.

Policies run interleaved: every round runs each (batch, policy) once, in shuffled order,
on a fresh scheduler that starts from the same learned state (a profile taken on this
CPU, embedded below). Printed per (batch, policy): median plan, apply and plan + apply
per step over rounds (each round's median), min..max over rounds, and the ratio to the
first policy.

`--trace PATH` writes every step's decision (the caps, per policy, batch and round) as
JSON: two runs of the same arguments on two versions of the policy must write the same
file if the policy decides the same (the synthetic inputs do not depend on timing).
`--trees A,B` compares two checkouts of the package (e.g. before and after a change):
each round runs this script once per tree, in shuffled order, in a fresh process with
that tree first on PYTHONPATH; printed per (batch, policy): each tree's median of the
rounds' plan + apply, min..max, and the ratio B / A per round (median, min..max).

`--tpot-ms` gives every request a TPOT budget; the scheduler's clock is then the
synthetic one (the step seconds summed), so the slack the policy sees is reproducible.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import specserve_ray.scheduler as scheduler_module
try:    # where the policy's state lives (the scheduler itself in older trees)
    import specserve_ray.speculation_choice as choice_module
except ImportError:
    choice_module = scheduler_module
from specserve_ray.config import LimitsConfig, SloConfig, SpeculationConfig
from specserve_ray.sampling_params import SamplingParams
from specserve_ray.contracts import Proposal, StepResult, VerifyResult
from specserve_ray.policy import CostModel
from specserve_ray.scheduler import Scheduler

# A profile and what serving taught it, from this CPU (tiny pair, fp32; ~/.cache/specserve_ray).
PROFILE = {
    "format": 2, "verify_features": ["intercept", "batch", "tokens", "batch*context",
                                     "tokens*context"],
    "draft_features": ["call", "steps", "steps*batch", "steps*batch*context"],
    "verify_coef": [0.0080175, 0.0, 0.00033663, 2.6430e-06, 0.0],
    "draft_coef": [7.7643e-05, 0.00030605, 3.1875e-05, 6.0347e-08],
    "scale": {"verify": 1.1827, "draft": 2.5738}, "step_overhead": 0.0075166}
LEARNED = {"format": 1,
           "acceptance": {"model": {"tested": [203.3, 132.8, 24.6, 7.48, 4.82] + [0.0] * 11,
                                    "accepted": [144.9, 36.2, 16.5, 4.82, 4.37] + [0.0] * 11}},
           "calibration": {"model": {
               "tested": [306.9, 75.0, 37.2, 15.8, 42.5, 47.9, 35.8, 3.56, 4.41, 0.0],
               "accepted": [103.7, 43.5, 18.1, 11.5, 40.0, 46.9, 35.8, 3.56, 4.41, 0.0]}},
           "goodput": {"1,1": [-0.54, 5], "1,0": [-0.41, 11], "0,3": [-0.23, 104],
                       "0,4": [-0.37, 20], "0,2": [-0.35, 77], "0,0": [-0.23, 12],
                       "0,1": [-0.39, 11], "0,5": [-0.38, 8], "1,2": [-0.18, 8],
                       "1,5": [-0.24, 28], "1,4": [-0.49, 3], "1,3": [-0.44, 3],
                       "3,2": [-0.12, 2], "3,1": [-0.11, 1], "3,3": [-0.1, 2]}}
DEPTH_ACCEPT = np.array([0.75, 0.3, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])   # what the "target" accepts


def tokenizer():
    from transformers import AutoTokenizer

    from specserve_ray.config import EMBEDDED_PAIR_DIR
    return AutoTokenizer.from_pretrained(str(EMBEDDED_PAIR_DIR / "target"))


class SyntheticWorkers:
    """Answers a StepPlan like the workers would, from a seeded stream."""

    def __init__(self, vocab: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.truth = CostModel.from_dict(PROFILE)

    def run(self, plan, contexts) -> tuple[StepResult, float]:
        rng = self.rng
        first = [int(rng.integers(100, self.vocab)) if item.last else None
                 for item in plan.prefill]
        if not plan.decode_ids:
            return StepResult(first, None, None, prefill_seconds=0.01), 0.01
        ks = np.asarray(plan.num_draft, np.int64)
        batch, width = len(ks), int(ks.max(initial=0))
        accepted, emitted = [], []
        for k in ks.tolist():
            n = 0
            while n < k and rng.random() < DEPTH_ACCEPT[min(n, len(DEPTH_ACCEPT) - 1)]:
                n += 1
            accepted.append(n)
            emitted.append([int(t) for t in rng.integers(100, self.vocab, size=n + 1)])
        proposal = None
        if width > 0:
            conf = rng.beta(4, 2, size=(batch, width)).astype(np.float32)
            conf[np.arange(width)[None, :] >= ks[:, None]] = 0.0
            proposal = Proposal(torch.zeros((batch, width), dtype=torch.int64),
                                torch.as_tensor(ks), None, torch.from_numpy(conf),
                                float(self.truth.predict_draft(batch, width, max(contexts))))
        verify_s = float(self.truth.predict_verify(batch, batch * (width + 1), max(contexts)))
        seconds = (verify_s + (proposal.seconds if proposal else 0.0)
                   + self.truth.step_overhead) * float(rng.lognormal(0.0, 0.05))
        return StepResult(first, VerifyResult(emitted, accepted, verify_s), proposal), seconds


class SyntheticClock:
    """Stands in for the scheduler's `time` module: monotonic() is simulated seconds."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def run_once(tok, policy: str, batch: int, steps: int, seed: int, max_k: int, trace: list,
             tpot_ms: float | None = None):
    slo = None
    if tpot_ms is not None:
        slo = SloConfig(classes=[{"name": "interactive", "tpot_s": tpot_ms / 1e3}],
                        default_class="interactive")
        scheduler_module.time = choice_module.time = SyntheticClock()
    limits = LimitsConfig(max_model_len=512, max_num_seqs=max(8, batch))
    sched = Scheduler(tok, len(tok), True, limits,
                      SpeculationConfig(num_speculative_tokens=max_k, policy="specserve"),
                      cost_model=CostModel.from_dict(PROFILE), slo=slo)
    chooser = getattr(sched, "chooser", sched)
    chooser.learned.load(LEARNED)
    sched.speculation = SpeculationConfig(num_speculative_tokens=max_k, policy=policy)
    workers = SyntheticWorkers(len(tok), seed)
    prompt_rng = random.Random(seed)
    params = SamplingParams(max_tokens=96, ignore_eos=True)

    def refill():
        while len(sched.running) + len(sched.waiting) < batch:
            sched.add_request([prompt_rng.randrange(100, len(tok)) for _ in range(64)], params)

    plan_s, apply_s = [], []
    while len(plan_s) < steps:
        refill()
        t0 = time.perf_counter()
        plan = sched.plan_step()
        decided = chooser._decision
        t1 = time.perf_counter()
        contexts = [r.context_len for r in sched.running] or [0]
        result, seconds = workers.run(plan, contexts)
        t2 = time.perf_counter()
        if tpot_ms is not None:
            choice_module.time.now += seconds
        sched.apply_step(plan, result, seconds)
        t3 = time.perf_counter()
        if plan.decode_ids and not plan.prefill:
            plan_s.append(t1 - t0)
            apply_s.append(t3 - t2)
            trace.append([list(plan.num_draft),
                          None if decided is None else [decided.probe, decided.control is not None,
                                                        list(decided.confidence)],
                          [r.confidence_ema for r in sched.running]])
    scheduler_module.time = choice_module.time = time
    return statistics.median(plan_s), statistics.median(apply_s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--policies", default="specserve,static:3")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-k", type=int, default=4)
    ap.add_argument("--trace")
    ap.add_argument("--tpot-ms", type=float)
    ap.add_argument("--trees")
    ap.add_argument("--json", help=argparse.SUPPRESS)     # per-cell results (--trees uses it)
    args = ap.parse_args()
    if args.trees:
        return compare_trees(args)
    tok = tokenizer()
    policies = args.policies.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    cells = [(b, p) for b in batches for p in policies]
    times = {c: [] for c in cells}
    traces = {f"{b}/{p}": [] for b, p in cells}
    for b, p in cells:      # warm-up (imports, first-call caches)
        run_once(tok, p, b, 20, 0, args.max_k, [], args.tpot_ms)
    order = random.Random(0)
    for r in range(args.rounds):
        todo = list(cells)
        order.shuffle(todo)
        for b, p in todo:
            trace = []
            times[b, p].append(run_once(tok, p, b, args.steps, 1000 + r, args.max_k, trace,
                                           args.tpot_ms))
            traces[f"{b}/{p}"].append(trace)
    for b in batches:
        base = None
        for p in policies:
            plans, applies = zip(*times[b, p])
            totals = [x + y for x, y in times[b, p]]
            total = statistics.median(totals)
            base = base or total
            print(f"B={b} {p:12s} plan {statistics.median(plans) * 1e3:.3f} ms  apply "
                  f"{statistics.median(applies) * 1e3:.3f} ms  plan+apply {total * 1e3:.3f} ms "
                  f"({min(totals) * 1e3:.3f}-{max(totals) * 1e3:.3f})  x{total / base:.2f} "
                  f"of {policies[0]}", flush=True)
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump(traces, f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{b}/{p}": [x + y for x, y in times[b, p]] for b, p in cells}, f)


def compare_trees(args):
    trees = [os.path.abspath(t) for t in args.trees.split(",")]
    runs = {t: {} for t in trees}
    order = random.Random(1)
    passed = ["--batches", args.batches, "--policies", args.policies, "--steps", str(args.steps),
              "--max-k", str(args.max_k)]
    passed += ["--tpot-ms", str(args.tpot_ms)] if args.tpot_ms else []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for tree in order.sample(trees, len(trees)):
                out = os.path.join(tmp, "cells.json")
                env = dict(os.environ, PYTHONPATH=f"{tree}:{tree}/kernels")
                subprocess.run([sys.executable, __file__, *passed, "--rounds", "1", "--json", out],
                               env=env, check=True, stdout=subprocess.DEVNULL)
                with open(out) as f:
                    for cell, totals in json.load(f).items():
                        runs[tree].setdefault(cell, []).extend(totals)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    before, after = trees[0], trees[-1]
    for cell in runs[before]:
        line = [f"{cell:14s}"]
        for tree in trees:
            values = runs[tree][cell]
            line.append(f"{os.path.basename(tree) or tree}: "
                        f"{statistics.median(values) * 1e3:.3f} ms "
                        f"({min(values) * 1e3:.3f}-{max(values) * 1e3:.3f})")
        ratios = [b / a for a, b in zip(runs[before][cell], runs[after][cell])]
        line.append(f"after/before {statistics.median(ratios):.3f} "
                    f"({min(ratios):.3f}-{max(ratios):.3f})")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
