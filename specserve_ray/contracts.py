"""The messages of one step, and the bounds a controller sets: contracts, nothing heavy.

The step loop (engine or Ray router) builds a `StepPlan`; the draft side answers with a
`DraftOutput` (its `Proposal`), the target side finishes the step with a `StepResult`.
They cross process boundaries when the workers are Ray actors, so they are small frozen
dataclasses of ints, lists and CPU tensors, with no model or tokenizer inside. This module
imports no torch, no Ray and no policy code at run time: transports, routers and tests
import it for the types alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:   # annotations only; the tensors arrive already built
    import torch

    from specserve_ray.policy.control import DraftControl


# Who drafts: the draft model, prompt lookup (n-gram match in the request's own tokens),
# or prompt lookup where it finds a match and the model elsewhere.
Drafter = Literal["model", "ngram", "model+ngram"]


@dataclass(frozen=True)
class SeqSampling:
    """The sampling knobs a worker needs for one sequence (hot-path copy of SamplingParams)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None       # already reduced to the generator's range (config.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class PrefillItem:
    """One chunk of a prompt to cache (chunked prefill: a prompt may take several steps)."""

    seq_id: str
    prompt_ids: list[int]      # this chunk's tokens, in order after the earlier chunks
    sampling: SeqSampling
    first: bool = True         # the sequence starts here (the worker takes a cache slot)
    last: bool = True          # the prompt ends here: the target samples the first token


@dataclass(frozen=True)
class Proposal:
    """Draft tokens for a batch, rows aligned with the request order of the step."""

    draft_token_ids: "torch.Tensor"      # [B, K] int64, PLACEHOLDER past num_draft_tokens
    num_draft_tokens: "torch.Tensor"     # [B] int64, tokens sent to the target for verification
    draft_probs: "torch.Tensor | None"   # [B, K, V] float32; None when every row is greedy
    draft_confidence: "torch.Tensor"     # [B, D] float32: draft prob of each drafted token
    seconds: float                       # time spent in draft forwards
    # [B] int64 tokens drafted per row, when an early stop or a verify trim made it differ
    # from both the plan's caps and num_draft_tokens; None = num_draft_tokens.
    num_drafted: "torch.Tensor | None" = None
    # [B] bool: rows whose drafts were fixed by the scheduler (n-gram), a point-mass
    # draft distribution (drafting/fixed.py); None = every row drafted by the model.
    fixed_rows: "torch.Tensor | None" = None

    @property
    def drafted(self) -> "torch.Tensor":
        return self.num_draft_tokens if self.num_drafted is None else self.num_drafted


@dataclass(frozen=True)
class VerifyResult:
    emitted: list[list[int]]             # per row: accepted drafts then one final token
    num_accepted: list[int]              # per row: accepted draft tokens
    seconds: float                       # time spent in the target forward + sampling


@dataclass(frozen=True)
class StepPlan:
    release: list[str] = field(default_factory=list)          # finished / cancelled
    prefill: list[PrefillItem] = field(default_factory=list)  # admitted this step
    decode_ids: list[str] = field(default_factory=list)       # running requests
    new_tokens: list[list[int]] = field(default_factory=list) # emitted since the draft saw them
    num_draft: list[int] = field(default_factory=list)        # k (cap) per running request
    # The policy's in-loop stop/trim rules for this step; None = draft to the cap, verify all.
    draft_control: "DraftControl | None" = None
    # Per decode row: drafts already chosen by the scheduler (prompt lookup), verified
    # as they are, or None = the draft model drafts this row. None = no fixed drafts.
    fixed_drafts: list[list[int] | None] | None = None
    fixed_confidence: list[list[float] | None] | None = None   # aligned with fixed_drafts


@dataclass(frozen=True)
class DraftOutput:
    plan: StepPlan
    proposal: Proposal | None
    draft_error: str | None = None
    prefill_seconds: float = 0.0
    # time.monotonic() when the draft actor entered and left its step (actor shells only;
    # None in-process). The router turns them into the step's hop times.
    marks: tuple[float, float] | None = None


@dataclass(frozen=True)
class StepResult:
    first_tokens: list[int | None]          # one per plan.prefill item; None unless `last`
    verify: VerifyResult | None
    proposal: Proposal | None
    draft_error: str | None = None
    prefill_seconds: float = 0.0            # draft + target prefill time in this step
    # time.monotonic() stamps (draft in, draft out, target in, target out), set by the
    # actor shells; draft ones are None when the target ran alone. None in-process.
    marks: tuple[float | None, float | None, float, float] | None = None


@dataclass(frozen=True)
class RuntimeBounds:
    """Limits a cluster controller sets on top of any policy (they only ever lower k)."""

    speculation_enabled: bool = True
    max_k: int | None = None
    verify_budget: int | None = None


NO_BOUNDS = RuntimeBounds()
