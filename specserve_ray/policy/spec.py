"""PolicySpec: the speculation policy string, parsed once into a typed value.

    "none" | "static" | "static:K" | "threshold" | "threshold:T" | "smartspec" | "specserve"

The config validates with `parse_policy` (no cost model, no policy object built), the
scheduler builds the policy from the spec (`make_policy`), and every other question a
caller has ("is it static? which k? does it need a profile?") is a property here.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PolicySpec", "parse_policy", "POLICY_FORMS"]

POLICY_FORMS = '"none", "static", "static:K", "threshold", "threshold:T", "smartspec" or "specserve"'
_COST_BASED = ("smartspec", "specserve")


@dataclass(frozen=True)
class PolicySpec:
    name: str                      # none | static | threshold | smartspec | specserve
    k: int | None = None           # static only; None = the config's num_speculative_tokens
    threshold: float = 0.4         # threshold only: the last token's probability to go on

    @property
    def needs_cost_model(self) -> bool:
        return self.name in _COST_BASED

    def static_k(self, default_k: int) -> int | None:
        """The fixed k of a static policy; None for the others ('none' included)."""
        if self.name != "static":
            return None
        return default_k if self.k is None else self.k

    def __str__(self) -> str:
        if self.name == "static" and self.k is not None:
            return f"static:{self.k}"
        if self.name == "threshold" and self.threshold != 0.4:
            return f"threshold:{self.threshold:g}"
        return self.name


def parse_policy(text) -> PolicySpec:
    """The spec of a policy string; ValueError naming the accepted forms otherwise."""
    if isinstance(text, PolicySpec):
        return text
    if not isinstance(text, str):
        raise ValueError(f"policy must be a string like {POLICY_FORMS}, got {text!r}")
    name, sep, arg = text.strip().lower().partition(":")
    if name in ("none", "smartspec", "specserve") and not sep:
        return PolicySpec(name)
    if name == "static":
        if not sep:
            return PolicySpec("static")
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"'static' needs an integer k, as in 'static:4' (got {text!r})") from None
        if not 0 <= k <= 16:
            raise ValueError(f"static k must be in [0, 16], got {k}")
        return PolicySpec("static", k=k)
    if name == "threshold":
        if not sep:
            return PolicySpec("threshold")
        try:
            threshold = float(arg)
        except ValueError:
            raise ValueError(f"'threshold:T' needs a number in (0, 1] (got {text!r})") from None
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in (0, 1], got {threshold}")
        return PolicySpec("threshold", threshold=threshold)
    raise ValueError(f"unknown speculation policy {text!r}; expected {POLICY_FORMS}")
