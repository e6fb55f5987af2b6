"""TargetWorker: prefill, and lossless verification of a ragged batch in one forward.

The worker owns the target model's KV caches and each sequence's committed tokens, so the
router only sends draft tokens in and receives emitted tokens back. Rejection sampling
runs here, next to the target's logits, so full target distributions never travel.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from specserve_ray.core.rejection import PLACEHOLDER_TOKEN_ID, rejection_sample
from specserve_kernels.greedy import greedy_verify
from specserve_ray.core.ragged import group_by_length
from specserve_ray.core.sampling import logits_to_probs, sample_from_probs, stream_seed
from specserve_ray.models.runner import ModelRunner
from specserve_ray.workers.synthetic import synthetic_accept
from specserve_ray.contracts import PrefillItem, SeqSampling, VerifyResult

# Target and draft draw from separate streams of the same request seed.
_TARGET_STREAM = 0x7A11


class _TargetSeq:
    __slots__ = ("committed", "sampling", "generator")

    def __init__(self, prompt_ids: list[int], sampling: SeqSampling):
        self.committed = list(prompt_ids)
        self.sampling = sampling
        self.generator = torch.Generator()
        if sampling.seed is not None:
            self.generator.manual_seed(stream_seed(sampling.seed, _TARGET_STREAM))
        else:
            self.generator.seed()


def sampling_tensors(samplings: list[SeqSampling]):
    temperature = torch.tensor([s.temperature for s in samplings], dtype=torch.float32)
    top_k = torch.tensor([s.top_k for s in samplings], dtype=torch.long)
    top_p = torch.tensor([s.top_p for s in samplings], dtype=torch.float32)
    return temperature, top_k, top_p


class TargetWorker:
    def __init__(self, runner: ModelRunner, synthetic_acceptance_rate: float | None = None):
        self.runner = runner
        self._seqs: dict[str, _TargetSeq] = {}
        # Benchmark only, NOT lossless: see workers/synthetic.py. None = real verification.
        self.synthetic_acceptance_rate = synthetic_acceptance_rate
        self._synthetic_gen = torch.Generator().manual_seed(0x5EED)

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def sampled(self, seq_ids: list[str]) -> list[bool]:
        """Which rows sample (fixed drafts need a point-mass draft distribution there)."""
        return [not self._seqs[s].sampling.greedy for s in seq_ids]

    def prefill(self, items: list[PrefillItem]) -> list[int | None]:
        """Cache prompt chunks (one unpadded forward, or rows of similar length sharing a
        padded one) and sample the first output token of each sequence whose prompt ends
        here (None for the others)."""
        self._begin_prefill(items)
        try:
            if self.runner.flat:
                rows = self.runner.forward_flat([i.seq_id for i in items],
                                                [i.prompt_ids for i in items],
                                                [False] * len(items))
                return self._first_tokens(items, [r[0] for r in rows])
            last: list[torch.Tensor | None] = [None] * len(items)
            for group in group_by_length([len(item.prompt_ids) for item in items]):
                rows = [items[g] for g in group]
                logits = self.runner.forward([r.seq_id for r in rows],
                                             [r.prompt_ids for r in rows], all_logits=False)
                for row, g in enumerate(group):
                    last[g] = logits[row]
            return self._first_tokens(items, last)
        except Exception:
            self.release([item.seq_id for item in items])
            raise

    def _begin_prefill(self, items: list[PrefillItem]) -> None:
        for item in items:
            if item.first:
                self.runner.add(item.seq_id)
                self._seqs[item.seq_id] = _TargetSeq([], item.sampling)
            self._seqs[item.seq_id].committed.extend(item.prompt_ids)

    def _first_tokens(self, items: list[PrefillItem], last_logits) -> list[int | None]:
        """last_logits: per item, its last position's logits [V]."""
        first_tokens: list[int | None] = [None] * len(items)
        for g, item in enumerate(items):
            if item.last:
                seq = self._seqs[item.seq_id]
                token = self._sample_one(last_logits[g].cpu(), seq)
                seq.committed.append(token)
                first_tokens[g] = token
        return first_tokens

    def prefill_and_verify(self, items: list[PrefillItem], seq_ids: list[str],
                           draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor,
                           draft_probs: torch.Tensor | None
                           ) -> tuple[list[int | None], VerifyResult, float]:
        """Prompt chunks and verification rows in ONE unpadded forward (runner.flat):
        one weight pass per step instead of two. Returns (first tokens, the verification,
        prefill seconds); the forward's time is split between the two by token share.
        Same arguments and results as `prefill` then `verify`."""
        start = time.perf_counter()
        seqs, fed, base_lens = self._verify_inputs(seq_ids, draft_token_ids, num_draft_tokens)
        self._begin_prefill(items)
        try:
            rows = self.runner.forward_flat([*seq_ids, *(i.seq_id for i in items)],
                                            [*fed, *(i.prompt_ids for i in items)],
                                            [True] * len(fed) + [False] * len(items))
            first = self._first_tokens(items, [r[0] for r in rows[len(fed):]])
        except Exception:
            self.release([item.seq_id for item in items])
            raise
        logits = torch.nn.utils.rnn.pad_sequence(rows[:len(fed)], batch_first=True)  # [B, T, V]
        verify = self._accept(seq_ids, seqs, fed, base_lens, logits, draft_token_ids,
                              num_draft_tokens, draft_probs, start)
        verify_tokens = sum(len(f) for f in fed)
        prefill_tokens = sum(len(i.prompt_ids) for i in items)
        prefill_s = verify.seconds * prefill_tokens / (prefill_tokens + verify_tokens)
        return first, replace(verify, seconds=verify.seconds - prefill_s), prefill_s

    def _sample_one(self, logits: torch.Tensor, seq: _TargetSeq) -> int:
        if seq.sampling.greedy:
            return int(torch.argmax(logits))
        t, k, p = sampling_tensors([seq.sampling])
        probs = logits_to_probs(logits.unsqueeze(0), t, k, p)
        noise = torch.empty(1, logits.shape[-1]).exponential_(generator=seq.generator)
        return int(sample_from_probs(probs, noise)[0])

    def verify(self, seq_ids: list[str], draft_token_ids: torch.Tensor,
               num_draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None) -> VerifyResult:
        """Score every row's pending token + drafts in one forward; accept; roll back.

        draft_token_ids: [B, K]; num_draft_tokens: [B]; draft_probs: [B, K, V] or None.
        """
        start = time.perf_counter()
        seqs, fed, base_lens = self._verify_inputs(seq_ids, draft_token_ids, num_draft_tokens)
        logits = self.runner.forward(seq_ids, fed, all_logits=True)  # [B, T, V] on device
        return self._accept(seq_ids, seqs, fed, base_lens, logits, draft_token_ids,
                            num_draft_tokens, draft_probs, start)

    def _verify_inputs(self, seq_ids, draft_token_ids, num_draft_tokens):
        """Each row's tokens to score (pending + drafts) and its length before them."""
        seqs = [self._seqs[s] for s in seq_ids]
        fed: list[list[int]] = []
        base_lens = []
        for i, seq in enumerate(seqs):
            cached = self.runner.cache_len(seq_ids[i])
            pending = seq.committed[cached:]          # the last emitted token(s)
            base_lens.append(cached + len(pending))
            n = int(num_draft_tokens[i])
            fed.append(pending + draft_token_ids[i, :n].tolist())
        return seqs, fed, base_lens

    def _accept(self, seq_ids, seqs, fed, base_lens, logits, draft_token_ids,
                num_draft_tokens, draft_probs, start) -> VerifyResult:
        """Rejection sampling over the verification logits [B, T, V] (rows right-padded)."""
        batch = len(seqs)
        max_k = draft_token_ids.shape[1]
        # Position j of the verification window is the logit after pending + j drafts.
        pending = [len(f) - int(num_draft_tokens[i]) for i, f in enumerate(fed)]
        if logits.shape[1] == max_k + 1 and all(n == 1 for n in pending):
            window_logits = logits          # the usual step: the window is every position
        else:
            window = (torch.tensor(pending).unsqueeze(1) - 1
                      + torch.arange(max_k + 1).unsqueeze(0)).clamp(max=logits.shape[1] - 1)
            window = window.to(logits.device)
            window_logits = logits.gather(1, window.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        vocab = logits.shape[-1]
        all_greedy = all(s.sampling.greedy for s in seqs)
        if all_greedy and self.synthetic_acceptance_rate is None:
            # Only [B, K+1] argmax ids leave the device; no probabilities are built.
            output_ids, num_emitted = greedy_verify(draft_token_ids, num_draft_tokens,
                                                    window_logits)
            return self._commit(seq_ids, seqs, base_lens, output_ids, num_emitted, start)
        window_logits = window_logits.cpu()
        target_argmax = window_logits.argmax(-1)                             # [B, K+1]
        is_greedy = torch.tensor([s.sampling.greedy for s in seqs])
        target_probs = None
        uniform = torch.zeros(batch, max_k)
        noise = torch.ones(batch, vocab)
        if not bool(is_greedy.all()):
            t, k, p = sampling_tensors([s.sampling for s in seqs])
            flat = window_logits.reshape(batch * (max_k + 1), vocab)
            rep = max_k + 1
            target_probs = logits_to_probs(flat, t.repeat_interleave(rep),
                                           k.repeat_interleave(rep), p.repeat_interleave(rep)
                                           ).view(batch, rep, vocab)
            for i, seq in enumerate(seqs):
                if not seq.sampling.greedy:
                    # Per-request streams, and exactly one draw per own draft token, keep
                    # seeded output independent of what else is in the batch.
                    n = int(num_draft_tokens[i])
                    uniform[i, :n] = torch.rand(n, generator=seq.generator)
                    noise[i] = torch.empty(vocab).exponential_(generator=seq.generator)
            if draft_probs is None:
                draft_probs = torch.zeros(batch, max_k, vocab)
        output_ids, num_emitted = rejection_sample(
            draft_token_ids, num_draft_tokens, draft_probs, target_probs, target_argmax,
            is_greedy, uniform, noise)
        if self.synthetic_acceptance_rate is not None:   # replaces the outcome, not the cost
            output_ids, num_emitted = synthetic_accept(
                draft_token_ids, num_draft_tokens, target_argmax,
                self.synthetic_acceptance_rate, vocab, self._synthetic_gen)
        return self._commit(seq_ids, seqs, base_lens, output_ids, num_emitted, start)

    def _commit(self, seq_ids, seqs, base_lens, output_ids, num_emitted, start) -> VerifyResult:
        """Keep accepted tokens in the cache and the committed text; roll back the rest."""
        emitted, accepted = [], []
        for i, seq_id in enumerate(seq_ids):
            n_out = int(num_emitted[i])
            tokens = output_ids[i, :n_out].tolist()
            assert PLACEHOLDER_TOKEN_ID not in tokens
            # The cache keeps pending + accepted drafts; the final token stays pending.
            self.runner.truncate(seq_id, base_lens[i] + n_out - 1)
            seqs[i].committed.extend(tokens)
            emitted.append(tokens)
            accepted.append(n_out - 1)
        return VerifyResult(emitted, accepted, time.perf_counter() - start)

    def release(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self._seqs.pop(s, None)
            self.runner.release(s)
