"""DraftWorker: proposes k tokens per sequence and reports each token's probability.

State sync is piggybacked on `propose`: the router passes the tokens each sequence has
emitted since its last proposal. The worker keeps the longest prefix of its cache that
agrees with them (accepted drafts stay cached, rejected ones are rolled back) and feeds
the rest. So a step costs one draft call and one target call, nothing else.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from specserve_ray.core.rejection import PLACEHOLDER_TOKEN_ID
from specserve_ray.core.ragged import group_by_length
from specserve_ray.core.sampling import (greedy_with_confidence, logits_to_probs,
                                         sample_from_probs, stream_seed)
from specserve_ray.models.runner import ModelRunner
from specserve_ray.policy.control import DraftControl
from specserve_ray.policy.drafter import record_step, start_drafting
from specserve_ray.workers.target import sampling_tensors
from specserve_ray.contracts import PrefillItem, Proposal, SeqSampling

_DRAFT_STREAM = 0xD2AF


class _DraftSeq:
    __slots__ = ("committed", "sampling", "generator")

    def __init__(self, prompt_ids: list[int], sampling: SeqSampling):
        self.committed = list(prompt_ids)
        self.sampling = sampling
        self.generator = torch.Generator()
        if sampling.seed is not None:
            self.generator.manual_seed(stream_seed(sampling.seed, _DRAFT_STREAM))
        else:
            self.generator.seed()


def _mask(batch: int, rows: torch.Tensor) -> np.ndarray:
    mask = np.zeros(batch, bool)
    mask[rows.numpy()] = True
    return mask


def _plain_greedy(sampling: SeqSampling, vocab: int) -> bool:
    """Greedy with no top-k / top-p filter: its confidence is the plain softmax's."""
    return (sampling.greedy and (sampling.top_k <= 0 or sampling.top_k >= vocab)
            and sampling.top_p >= 1.0)


def _draft_step(logits: torch.Tensor, active: list[int], needs_probs: list[bool],
                sampled: list[bool], seqs: list[_DraftSeq], temperature: torch.Tensor,
                top_k: torch.Tensor, top_p: torch.Tensor):
    """One drafted token per active row: (tokens [A] int64, confidence [A] float32,
    probs [A, V] or None), on the CPU. logits: [A, V] on the runner's device.

    Sampled rows draw their exponential noise from their own generators (one draw of V
    per drafted token, so seeded output does not depend on the batch) and are sampled
    in one vectorized op.
    """
    if not any(needs_probs[a] for a in active):
        tokens, conf = greedy_with_confidence(logits)
        return tokens.cpu(), conf.cpu(), None
    sel = torch.tensor(active)
    probs = logits_to_probs(logits.float(), temperature[sel].to(logits.device),
                            top_k[sel].to(logits.device), top_p[sel].to(logits.device)).cpu()
    tokens = probs.argmax(-1)
    a_sampled = [a_pos for a_pos, a in enumerate(active) if sampled[a]]
    if a_sampled:
        vocab = probs.shape[-1]
        noise = torch.stack([torch.empty(vocab).exponential_(generator=seqs[active[a_pos]].generator)
                             for a_pos in a_sampled])                            # [S, V]
        tokens[a_sampled] = sample_from_probs(probs[a_sampled], noise)
    conf = probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, conf, probs


class DraftWorker:
    def __init__(self, runner: ModelRunner, lean: bool | None = None):
        self.runner = runner
        # A draft's forward only proposes (the target checks every token), so it may take
        # the lean Llama forward: about half the eager dispatch of a Hugging Face forward.
        if lean is None:
            lean = os.environ.get("SPECSERVE_LEAN_DRAFT", "1") != "0"
        if lean:
            runner.use_lean_forward()
        self._seqs: dict[str, _DraftSeq] = {}

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def prefill(self, items: list[PrefillItem]) -> None:
        """Cache prompt chunks, rows of similar length in one forward (see the target's)."""
        for item in items:
            if item.first:
                self.runner.add(item.seq_id)
                self._seqs[item.seq_id] = _DraftSeq([], item.sampling)
            self._seqs[item.seq_id].committed.extend(item.prompt_ids)
        try:
            for group in group_by_length([len(item.prompt_ids) for item in items]):
                rows = [items[g] for g in group]
                self.runner.forward([r.seq_id for r in rows], [r.prompt_ids for r in rows],
                                    all_logits=False)
        except Exception:
            self.release([item.seq_id for item in items])
            raise

    def _sync(self, seq_id: str, new_tokens: list[int]) -> list[int]:
        """Commit `new_tokens`; roll the cache back to where it agrees; return what to feed."""
        seq = self._seqs[seq_id]
        committed_len = len(seq.committed)
        seq.committed.extend(new_tokens)
        cached = self.runner.tokens(seq_id)
        keep = min(len(cached), committed_len)
        while keep < len(cached) and keep < len(seq.committed) and cached[keep] == seq.committed[keep]:
            keep += 1
        if keep < len(cached):
            self.runner.truncate(seq_id, keep)
        return seq.committed[keep:]

    def propose(self, seq_ids: list[str], new_tokens: list[list[int]],
                num_draft: list[int], control: DraftControl | None = None) -> Proposal:
        """Draft up to `num_draft[i]` tokens for each row (0 = no drafting for that row).

        With a `control`, rows stop early by its stop rule (checked before every draft
        step from the confidences so far) and the result is trimmed by its verify rule;
        without one every row drafts exactly its cap (the fast path).
        """
        start = time.perf_counter()
        batch = len(seq_ids)
        max_k = max(num_draft, default=0)
        vocab = self.runner.vocab_size
        draft_ids = torch.full((batch, max_k), PLACEHOLDER_TOKEN_ID, dtype=torch.long)
        confidence = torch.zeros(batch, max_k)
        feeds = [self._sync(s, t) for s, t in zip(seq_ids, new_tokens)]
        # Rows with k = 0 only sync; their feed stays pending until they next draft.
        rows = [i for i in range(batch) if num_draft[i] > 0]
        seqs = [self._seqs[seq_ids[i]] for i in rows]
        sampled = [not s.sampling.greedy for s in seqs]
        # Only rows whose sampling filters the distribution need the processed probs;
        # plain greedy rows take the logits' argmax (no [A, V] softmax, no host copy).
        needs_probs = [not _plain_greedy(s.sampling, vocab) for s in seqs]
        draft_probs = torch.zeros(batch, max_k, vocab) if any(sampled) else None
        progress = start_drafting(num_draft) if control is not None else None
        drafted_width = 0
        if rows:
            temperature = top_k = top_p = None
            if any(needs_probs):
                temperature, top_k, top_p = sampling_tensors([s.sampling for s in seqs])
            active = list(range(len(rows)))   # positions in `rows` still drafting
            step_feed = [feeds[i] for i in rows]
            for j in range(max_k):
                if progress is not None:
                    keep = control.should_continue(progress)       # [B] bool
                    active = [a for a in active if keep[rows[a]]]
                    if not active:
                        break
                ids = [seq_ids[rows[a]] for a in active]
                logits = self.runner.forward(ids, [step_feed[a] for a in active],
                                             all_logits=False)                  # [A, V]
                tokens, token_conf, probs = _draft_step(
                    logits, active, needs_probs, sampled, seqs, temperature, top_k, top_p)
                out_rows = [rows[a] for a in active]
                if len(out_rows) == batch:   # every row drafts: whole columns, no scatter
                    draft_ids[:, j] = tokens
                    confidence[:, j] = token_conf
                else:
                    out_idx = torch.tensor(out_rows)
                    draft_ids[out_idx, j] = tokens
                    confidence[out_idx, j] = token_conf
                if draft_probs is not None:
                    a_sampled = [a_pos for a_pos, a in enumerate(active) if sampled[a]]
                    draft_probs[[out_rows[a_pos] for a_pos in a_sampled], j] = \
                        probs[a_sampled].to(draft_probs.device)
                drafted_width = j + 1
                if progress is not None:
                    step_conf = np.zeros(batch)
                    step_conf[out_rows] = token_conf.numpy()
                    progress = record_step(progress, control.calibrated(step_conf),
                                           _mask(batch, torch.tensor(out_rows)))
                # Rows whose k is reached stop; the others feed the token just drafted.
                token_list = tokens.tolist()
                still = [a_pos for a_pos, a in enumerate(active) if num_draft[rows[a]] > j + 1]
                step_feed = [None] * len(rows)
                for a_pos in still:
                    step_feed[active[a_pos]] = [token_list[a_pos]]
                active = [active[a_pos] for a_pos in still]
                if not active:
                    break
        if progress is None:
            num = torch.tensor(num_draft, dtype=torch.long)
            return Proposal(draft_ids, num, draft_probs, confidence,
                            time.perf_counter() - start)
        drafted = progress.num_drafted
        verify = control.select_verify(confidence[:, :drafted_width].numpy().astype(np.float64),
                                       drafted, progress.active_counts)
        width = int(verify.max(initial=0))
        # Tokens past a row's verified count are not scored: mark them and cut the width
        # so the target's window is no wider than the longest verified row.
        past = torch.arange(max_k).unsqueeze(0) >= torch.from_numpy(verify).unsqueeze(1)
        draft_ids[past] = PLACEHOLDER_TOKEN_ID
        return Proposal(draft_ids[:, :width].contiguous(), torch.from_numpy(verify),
                        None if draft_probs is None else draft_probs[:, :width].contiguous(),
                        confidence[:, :drafted_width].contiguous(),
                        time.perf_counter() - start, torch.from_numpy(drafted.copy()))

    def release(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self._seqs.pop(s, None)
            self.runner.release(s)
