"""Prompt-lookup (n-gram) drafting: propose what followed the sequence's own suffix before.

For a sequence t[0..L) (prompt + output so far) find the longest n in [min_n, max_n] such
that the suffix t[L-n..L) occurred earlier, at the most recent position i < L-n, and
propose the tokens that followed it: t[i+n], t[i+n+1], ... up to k of them. When the
match is so recent that the copy runs into the sequence's end, the copy continues into
its own proposal (t extended by what was proposed), so a period-p repetition is
proposed for all k tokens rather than cut at L.

Pure numpy, no model: it runs in the scheduler on every step for every n-gram row, so
it works on an incremental token buffer (`TokenHistory`) and one vectorized scan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NgramMatch", "TokenHistory", "find_match", "propose", "NgramAcceptance",
           "expected_accepted"]


class TokenHistory:
    """A growing int64 buffer of a request's tokens (append-only, amortized O(1))."""

    __slots__ = ("_buf", "_len")

    def __init__(self, tokens=()):
        tokens = np.asarray(list(tokens), np.int64)
        self._buf = np.empty(max(64, 2 * tokens.size), np.int64)
        self._buf[:tokens.size] = tokens
        self._len = tokens.size

    def __len__(self) -> int:
        return self._len

    def extend(self, tokens) -> None:
        n = len(tokens)
        if not n:
            return
        if self._len + n > self._buf.size:
            grown = np.empty(max(2 * self._buf.size, self._len + n), np.int64)
            grown[:self._len] = self._buf[:self._len]
            self._buf = grown
        self._buf[self._len:self._len + n] = tokens
        self._len += n

    def view(self) -> np.ndarray:  # [L] int64, valid until the next extend
        return self._buf[:self._len]


@dataclass(frozen=True)
class NgramMatch:
    start: int       # i: where the earlier occurrence of the suffix begins
    length: int      # n: tokens matched


def find_match(tokens: np.ndarray, min_n: int, max_n: int) -> NgramMatch | None:
    """The longest (then most recent) earlier occurrence of a suffix of `tokens` [L]."""
    size = tokens.shape[0]
    if size < min_n + 1 or min_n < 1:
        return None
    last = tokens[size - 1]
    # Candidate ends c < L-1 with t[c] == t[L-1]: the match would be t[c-n+1..c].
    ends = np.flatnonzero(tokens[:size - 1] == last)
    if ends.size == 0:
        return None
    length = np.ones(ends.size, np.int64)
    alive = np.ones(ends.size, bool)
    for d in range(1, max_n):
        if not alive.any():
            break
        back = ends - d
        ok = alive & (back >= 0)
        ok[ok] = tokens[back[ok]] == tokens[size - 1 - d]
        length += ok
        alive = ok
    best = int(length.max())
    if best < min_n:
        return None
    # Longest first; among equals the most recent (largest end).
    end = int(ends[np.flatnonzero(length == best)[-1]])
    return NgramMatch(end - best + 1, best)


def propose(tokens: np.ndarray, k: int, min_n: int, max_n: int
            ) -> tuple[list[int], int]:
    """Up to `k` draft tokens from the longest recent n-gram match, and the match length
    (0 and [] when nothing matches)."""
    if k <= 0:
        return [], 0
    match = find_match(tokens, min_n, max_n)
    if match is None:
        return [], 0
    size = tokens.shape[0]
    src = match.start + match.length        # first copied position, < size
    avail = size - src
    if avail >= k:
        return tokens[src:src + k].tolist(), match.length
    # The copy runs into the end: continue it periodically (period = size - src).
    period = tokens[src:size]
    reps = -(-k // avail)
    return np.tile(period, reps)[:k].tolist(), match.length


class NgramAcceptance:
    """Running estimate of P(n-gram draft token j is accepted | tokens before it were),
    per match length n and depth j: the confidence the policies read for n-gram rows.

    Each verified row tells, for depths 0..a (a = accepted), a accepts and at most one
    reject; depths past the first rejection are not observed. An exponential moving
    average (weight `weight` per observation) follows drifting text.
    """

    def __init__(self, max_n: int, max_k: int = 16, prior: float = 0.6, weight: float = 0.05):
        self.prior = prior
        self.weight = weight
        self.table = np.full((max_n + 1, max(max_k, 1)), prior)   # [n, depth]

    def confidences(self, match_length: int, num: int) -> list[float]:
        """Per-token acceptance estimates for a proposal of `num` tokens."""
        row = self.table[min(match_length, self.table.shape[0] - 1)]
        if num > row.shape[0]:
            row = np.concatenate([row, np.full(num - row.shape[0], row[-1])])
        return row[:num].tolist()

    def observe(self, match_length: int, num_drafted: int, num_accepted: int) -> None:
        if num_drafted <= 0:
            return
        n = min(match_length, self.table.shape[0] - 1)
        seen = min(num_accepted + 1, num_drafted, self.table.shape[1])
        outcome = np.zeros(seen)
        outcome[:min(num_accepted, seen)] = 1.0
        row = self.table[n, :seen]
        self.table[n, :seen] = row + self.weight * (outcome - row)


def expected_accepted(confidences) -> float:
    """Expected accepted tokens of a draft whose token j is accepted with conditional
    probability confidences[j] (a draft is accepted up to its first rejection)."""
    return float(np.cumprod(np.asarray(confidences, np.float64)).sum()) if len(confidences) else 0.0
