"""Bounded start-up profile of a model runner, and the on-disk cache of the fitted model.

    samples = profile_runner(runner, "verify", profile_grid(...), repeats=2, time_budget_s=5)
    cost = load_or_profile(None, key, lambda: CostModel().fit(samples))

`profile_runner` times `runner.forward` on scratch sequences of its own (added, rolled
back and released here), so it can run beside live requests as long as cache slots are
free; grid points that do not fit the slots or the context are skipped. It stops when
its time budget is spent, cheapest shapes first, so a short budget still yields a
usable (if coarser) sample set. Unlike the rest of this package it touches a model;
it needs only the runner's methods (add, forward, truncate, release).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from itertools import groupby
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from specserve_ray.policy.cost_model import CostModel, Sample, profile_grid

__all__ = ["profile_runner", "load_or_profile", "cache_dir", "profile_cost_model", "profile_grids",
           "cost_model_key", "load_learned", "save_learned", "attach_persistence"]

log = logging.getLogger("specserve_ray")
_SCRATCH = "__specserve_profile_{}__"


def profile_runner(runner, kind: str, grid: Sequence[tuple[int, int, float]], repeats: int = 2,
                   time_budget_s: float = 5.0, seed: int = 0) -> list[Sample]:
    """Time `runner.forward` over `grid` points (batch, tokens, context); median of repeats.

    kind="verify": one forward feeding tokens // batch new tokens per row (all logits,
    as verification does). kind="draft": `tokens` sequential one-token forwards per row
    (last logits only, as drafting does). Returns one Sample per measured point.
    """
    if kind not in ("verify", "draft"):
        raise ValueError(f"kind must be 'verify' or 'draft', got {kind!r}")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    deadline = time.perf_counter() + time_budget_s
    sync = getattr(runner, "synchronize", None) or (lambda: None)
    free = runner.max_seqs - runner.num_seqs()
    rng = np.random.default_rng(seed)
    vocab = int(runner.vocab_size)
    samples: list[Sample] = []

    def per_row(point) -> int:
        batch, tokens, _ = point
        return tokens // batch if kind == "verify" else tokens

    def fits(point) -> bool:
        batch, _, context = point
        return 1 <= batch <= free and int(context) + per_row(point) <= runner.max_model_len \
            and int(context) >= 1 and per_row(point) >= 1

    fitting = [p for p in grid if fits(p)]
    # The corners of the (batch, context) range first, then the rest cheapest first: a
    # short budget still spans the whole range the deployment serves, coarsely.
    batches = {min((p[0] for p in fitting), default=0), max((p[0] for p in fitting), default=0)}
    contexts = {min((int(p[2]) for p in fitting), default=0),
                max((int(p[2]) for p in fitting), default=0)}

    def order(p):
        corner = p[0] in batches and int(p[2]) in contexts
        return (not corner, p[0] * (p[2] + 1), p[1])

    points = sorted(fitting, key=order)
    # One scratch prefill per (batch, context) group; the points of a group share it.
    for (batch, context), group in groupby(points, key=lambda p: (p[0], int(p[2]))):
        if time.perf_counter() >= deadline:
            break
        ids = [_SCRATCH.format(i) for i in range(batch)]
        added = []
        try:
            for sid in ids:
                runner.add(sid)
                added.append(sid)
            prompt = rng.integers(0, vocab, context).tolist()
            runner.forward(ids, [prompt] * batch, all_logits=False)
            warmed = False
            for point in group:
                n = per_row(point)
                feed = [rng.integers(0, vocab, n).tolist() for _ in ids]
                times = []
                for _ in range(repeats + (0 if warmed else 1)):
                    if time.perf_counter() >= deadline:
                        break
                    start = time.perf_counter()
                    if kind == "verify":
                        runner.forward(ids, feed, all_logits=True)
                    else:
                        for j in range(n):
                            runner.forward(ids, [[f[j]] for f in feed], all_logits=False)
                    sync()   # GPU forwards return before their kernels finish
                    elapsed = time.perf_counter() - start
                    for sid in ids:
                        runner.truncate(sid, context)
                    if warmed:
                        times.append(elapsed)
                    warmed = True   # the first call of a group allocates; not timed
                if times:
                    samples.append(Sample(kind, batch, point[1], float(context),
                                          statistics.median(times)))
                if time.perf_counter() >= deadline:
                    break
        finally:
            for sid in added:
                runner.release(sid)
    return samples


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where fitted cost models live: `path`, else $SPECSERVE_CACHE_DIR, else
    ~/.cache/specserve_ray."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("SPECSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specserve_ray"


def load_or_profile(directory: str | os.PathLike | None, key: str,
                    fn: Callable[[], CostModel]) -> CostModel:
    """The cached CostModel under `key`, or `fn()`'s, which is then cached (JSON).

    An unreadable or stale-format cache file is re-profiled; a cache that cannot be
    written only logs a warning (the model is still returned).
    """
    path = _cache_path(directory, key)
    if path.is_file():
        try:
            return CostModel.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring cost model cache %s: %s", path, exc)
    model = fn()
    _write(path, model.to_dict())
    return model


def _cache_path(directory, key: str) -> Path:
    return cache_dir(directory) / f"cost-{key}.json"


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cost-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)   # atomic: concurrent readers never see half a file
    except OSError as exc:
        log.warning("cannot cache the cost model at %s: %s", path, exc)


def load_learned(directory: str | os.PathLike | None, key: str) -> dict | None:
    """The learned state saved beside the cached cost model under `key` (None if none)."""
    try:
        data = json.loads(_cache_path(directory, key).read_text())
    except (OSError, ValueError):
        return None
    learned = data.get("learned") if isinstance(data, dict) else None
    return learned if isinstance(learned, dict) else None


def save_learned(directory: str | os.PathLike | None, key: str, cost: CostModel,
                 learned) -> None:
    """Rewrite the cache entry with the cost model as serving corrected it (scale, step
    overhead) and the learned state (learned.LearnedState), so a restart resumes them."""
    _write(_cache_path(directory, key), {**cost.to_dict(), "learned": learned.to_dict()})


def attach_persistence(chooser, directory: str | os.PathLike | None, key: str) -> None:
    """Load what an earlier run learned into `chooser.learned` (a scheduler's
    speculation_choice.SpeculationChooser) and save it as it goes (every
    `chooser.persist_every` decode steps)."""
    chooser.learned.load(load_learned(directory, key))

    def persist():
        if chooser.cost_model is not None:
            save_learned(directory, key, chooser.cost_model, chooser.learned)

    chooser.persist_learned = persist


def cost_model_key(target_path: str, draft_path: str | None, dtype: str, device: str) -> str:
    """Cache key of a draft/target pair's cost model on this software stack."""
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name()
    return CostModel.key(f"{target_path}|{draft_path}", dtype, device, versions)


def profile_grids(max_seqs: int, max_k: int, max_model_len: int):
    """The (verify, draft) grids of the start-up profile: the batch and context range the
    deployment serves (up to max_num_seqs rows, contexts up to max_model_len less the
    longest verified row), log-spaced so its size stays small."""
    longest = max(max_model_len - max(max_k, 1) - 2, 1)
    contexts = sorted({max(min(16, longest), 1), max(longest // 4, 1), longest})
    max_batch = max(1, max_seqs)
    verify = profile_grid(max_batch, max(max_k, 1) + 1, contexts, "verify")
    draft = profile_grid(max_batch, max(max_k, 1) + 1, contexts, "draft")
    return verify, draft


def profile_cost_model(profile_verify: Callable[[list, float], list[Sample]],
                       profile_draft: Callable[[list, float], list[Sample]] | None,
                       max_seqs: int, max_k: int, max_model_len: int,
                       budget_s: float = 10.0) -> CostModel:
    """Profile the target (60% of the budget) and the draft (40%), then fit."""
    verify_grid, draft_grid = profile_grids(max_seqs, max_k, max_model_len)
    share = 0.6 if profile_draft is not None else 1.0
    samples = list(profile_verify(verify_grid, budget_s * share))
    if profile_draft is not None:
        samples += profile_draft(draft_grid, budget_s * (1 - share))
    return CostModel().fit(samples)
