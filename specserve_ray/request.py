"""One request's state in the step loop, and what the loop hands back for it.

    waiting ──admit──> prefilling (chunk by chunk) ──first token──> running ──> finished

`Request` is mutable state owned by the scheduler; `RequestOutput` is the frozen delta a
step produced for one request (what streams carry); `GenerationResult` is a finished
request as the in-process engine returns it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from specserve_ray.sampling_params import SamplingParams
from specserve_ray.drafting.ngram import TokenHistory
from specserve_ray.output import TextStream
from specserve_ray.policy.slo import NO_SLO, SloClass
from specserve_ray.stats import SpecStats


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    num_speculative_tokens: int | None = None    # per-request override of the static k
    slo: SloClass = NO_SLO                        # latency class (TTFT / TPOT budgets)
    output_ids: list[int] = field(default_factory=list)
    text: TextStream | None = None                # incremental detokenizer + stop strings
    sent_token_len: int = 0                       # output tokens already handed out
    unsynced_draft: list[int] = field(default_factory=list)  # emitted, not yet told to draft
    # Prompt tokens already sent to the workers (chunked prefill); the first token comes
    # when the last chunk is scored.
    num_prefilled: int = 0
    # Output tokens prefilled again after a worker fault (re-admission): the workers get
    # prompt + this much committed output as the prompt; the stream is unaffected.
    resumed_len: int = 0
    finished: bool = False
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    spec: SpecStats = field(default_factory=SpecStats)
    # Running mean acceptance estimate (adaptive policies); None until the policy has one:
    # it then starts from the acceptance measured for its drafter (policy/learned.py).
    confidence_ema: float | None = None
    history: TokenHistory | None = None   # prompt + output as int64 (n-gram drafting)

    def token_history(self) -> TokenHistory:
        """Prompt + output so far, kept incrementally (built on first use)."""
        if self.history is None:
            self.history = TokenHistory(self.prompt_ids)
        seen = len(self.history) - len(self.prompt_ids)
        if seen < len(self.output_ids):
            self.history.extend(self.output_ids[seen:])
        return self.history

    def tpot_slack(self, now: float) -> float:
        """Seconds this request is ahead (+) or behind (-) its TPOT budget so far (0 without
        a budget or before its first token)."""
        if self.first_token_time is None or not math.isfinite(self.slo.tpot_s):
            return 0.0
        return self.slo.tpot_s * (len(self.output_ids) - 1) - (now - self.first_token_time)

    def ttft_slack(self, now: float) -> float:
        """Seconds left before its TTFT budget (+inf without one, or once a first token
        was sent: a re-admitted request has had its first token)."""
        if self.first_token_time is not None or not math.isfinite(self.slo.ttft_s):
            return math.inf
        return self.arrival_time + self.ttft_budget() - now

    def ttft_budget(self) -> float:
        """Its class's TTFT budget at its prompt length (inf = none)."""
        return self.slo.ttft_budget(len(self.prompt_ids))

    def take_delta(self) -> "RequestOutput":
        """What was committed since the last delta (the stream's next item)."""
        new_text = self.text.take(self.finished)
        new_ids = self.output_ids[self.sent_token_len:]
        self.sent_token_len = len(self.output_ids)
        return RequestOutput(self.request_id, new_ids, new_text, self.finished,
                             self.finish_reason, len(self.prompt_ids), len(self.output_ids),
                             self.spec.copy())

    @property
    def context_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_ids(self) -> list[int]:
        """What the workers prefill: the prompt, plus committed output when re-admitted."""
        if not self.resumed_len:
            return self.prompt_ids
        return self.prompt_ids + self.output_ids[:self.resumed_len]

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled >= len(self.prompt_ids) + self.resumed_len


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    spec: SpecStats


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    spec: SpecStats
