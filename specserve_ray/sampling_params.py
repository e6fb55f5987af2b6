"""A request's decoding parameters, validated at the boundary (OpenAI names and ranges).

Every front door (HTTP, gRPC, Python handle) builds one `SamplingParams`; the workers get
the plain `SeqSampling` copy of it (`seq_sampling`), with the seed already reduced to the
generator's range and top_k capped at the vocabulary.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from specserve_ray.contracts import Drafter, SeqSampling
from specserve_ray.errors import RequestError


# Seeds: any integer a client may send (OpenAI's int64 and uint64 alike) is accepted and
# reduced to torch.Generator's range; beyond it the request is refused.
SEED_MIN, SEED_END = -2**63, 2**64
# top_k above any vocabulary keeps every token; values are clamped here so that only
# int32-sized numbers reach the workers' tensors (the engine caps them at the vocabulary).
MAX_TOP_K = 2**31 - 1


def generator_seed(seed: int) -> int:
    """`seed` in [SEED_MIN, SEED_END) reduced deterministically into [0, 2**64), the range
    torch.Generator.manual_seed takes (two's complement: -1 and 2**64 - 1 are one seed)."""
    return seed % 2**64


class SamplingParams(BaseModel):
    """Per-request decoding parameters (OpenAI names and ranges), typed strictly: a bool is
    not an int, a float is not an int, NaN and infinities are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    max_tokens: int = Field(64, description="Tokens to generate at most (>= 1).")
    temperature: float = Field(0.0, description="0 = greedy; (0, 2] samples.")
    top_p: float = Field(1.0, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(0, description="Keep the k most likely tokens; 0 or -1 = off; above "
                       "the vocabulary = off.")
    seed: int | None = Field(None, description="Seed for reproducible sampling: any integer "
                             "in [-2**63, 2**64), reduced to the generator's range.")
    stop: tuple[str, ...] = Field((), description="Stop strings; the output ends before them "
                                  "(how many and how long: front.max_stop_strings / "
                                  "max_stop_chars at the front door).")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks).")
    drafter: Drafter | None = Field(None, description="This request's drafter ('model', "
                                    "'ngram', 'model+ngram'); None = speculation.drafter.")

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"max_tokens must be > 0, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temp(cls, v: float) -> float:
        if not 0.0 <= v <= 2.0:
            raise ValueError(f"temperature must be >= 0 and <= 2, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive count, got {v}")
        return min(max(v, 0), MAX_TOP_K)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not SEED_MIN <= v < SEED_END:
            raise ValueError("seed must be an integer in [-2**63, 2**64)")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        from specserve_ray.api.inputs import check_text

        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)):
            raise RequestError("stop must be a string or a list of strings", "stop",
                               "invalid_type")
        v = tuple(v)
        for i, s in enumerate(v):
            if not isinstance(s, str):
                raise RequestError(f"stop[{i}] must be a string", f"stop[{i}]", "invalid_type")
            if s == "":
                raise ValueError("stop must be a non-empty string or a list of non-empty "
                                 "strings")
            check_text(s, f"stop[{i}]", controls=True)
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def seq_sampling(self, vocab_size: int | None = None) -> SeqSampling:
        """The workers' copy: seed in the generator's range, top_k at most the vocabulary."""
        top_k = min(self.top_k, vocab_size or MAX_TOP_K)
        seed = None if self.seed is None else generator_seed(self.seed)
        return SeqSampling(self.temperature, top_k, self.top_p, seed)
