"""Expected tokens per step and efficiency (tokens per second) of a speculation plan.

Glossary (DESIGN.md, "The algorithms"): request i drafts k_i tokens whose draft
probabilities p_i1..p_ik are its *draft confidences*; c_ij = p_i1 * ... * p_ij is the
prefix survival, SpecServe's proxy for the chance that the target accepts token j
(arXiv 2503.05096, section 5). A verification step emits the accepted tokens plus one
final (recovered or bonus) token per request, so a plan is worth

    N = B + sum_i sum_{j <= k_i} c_ij   tokens,    E = N / T   tokens per second.

With one acceptance rate a for every token (SmartSpec, arXiv 2406.14066) the per-request
term is 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a).

Everything here is host-side arithmetic on small arrays: inputs may be torch tensors,
numpy arrays or nested lists, outputs are numpy arrays or floats.
"""
from __future__ import annotations

import numpy as np

__all__ = ["as_array", "cumulative_confidence", "draft_mask", "expected_tokens", "efficiency",
           "expected_tokens_uniform", "goodput_uniform"]


def as_array(values, dtype=np.float64) -> np.ndarray:
    """Torch tensor (any device), numpy array or nested list -> numpy array of `dtype`."""
    if hasattr(values, "detach"):           # torch.Tensor without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def cumulative_confidence(draft_confidences) -> np.ndarray:  # [B, K] float64
    """c_ij = p_i1 * ... * p_ij from per-token draft confidences [B, K].

    Confidences are clipped to [0, 1] (NaN counts as 0) so c never grows along a row:
    the verifier's greedy optimality argument relies on that monotonicity.
    """
    probs = np.nan_to_num(as_array(draft_confidences), nan=0.0)
    if probs.ndim != 2:
        raise ValueError(f"draft confidences must be [B, K], got shape {probs.shape}")
    return np.cumprod(np.clip(probs, 0.0, 1.0), axis=1)


def draft_mask(num_draft, width: int) -> np.ndarray:  # [B, width] bool
    """True where token j (0-based) of request i was drafted, i.e. j < num_draft[i]."""
    counts = as_array(num_draft, np.int64)
    return np.arange(width)[None, :] < counts[:, None]


def expected_tokens(draft_confidences, num_draft) -> float:
    """N = B + sum_i sum_{j <= k_i} c_ij for confidences [B, K] and k = num_draft [B]."""
    counts = as_array(num_draft, np.int64)
    survival = cumulative_confidence(draft_confidences)
    if survival.shape[0] != counts.shape[0]:
        raise ValueError("draft confidences and num_draft disagree on the batch size")
    if counts.size and counts.max(initial=0) > survival.shape[1]:
        raise ValueError("num_draft exceeds the number of confidence columns")
    return float(counts.shape[0] + survival[draft_mask(counts, survival.shape[1])].sum())


def efficiency(expected: float, seconds: float) -> float:
    """Tokens per second of a step that emits `expected` tokens in `seconds`."""
    if seconds <= 0:
        raise ValueError(f"step time must be positive, got {seconds}")
    return expected / seconds


def expected_tokens_uniform(acceptance, num_draft):
    """Tokens one request emits per step with k drafts accepted i.i.d. with rate a.

    (1 - a^(k+1)) / (1 - a); the a -> 1 limit is k + 1. Broadcasts over arrays.
    """
    rate = np.clip(as_array(acceptance), 0.0, 1.0)
    k = as_array(num_draft)
    near_one = np.isclose(rate, 1.0)
    safe_rate = np.where(near_one, 0.5, rate)          # keeps the unused branch finite
    value = np.where(near_one, k + 1.0, (1.0 - safe_rate ** (k + 1.0)) / (1.0 - safe_rate))
    return float(value) if value.ndim == 0 else value


def goodput_uniform(batch: int, acceptance: float, num_draft: int, seconds: float) -> float:
    """SmartSpec's goodput: B (1 - a^(k+1)) / (1 - a) tokens over a step of `seconds`."""
    return efficiency(batch * expected_tokens_uniform(acceptance, num_draft), seconds)
