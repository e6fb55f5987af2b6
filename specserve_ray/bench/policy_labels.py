"""Policy labels of `bench sweep`: a policy, optionally with live speculation knobs.

    POLICY[@KEY=VALUE[,KEY=VALUE...]]       e.g. "specserve@yield_to_prompts=true"

A variant runs as its own "policy" of the sweep, so two settings of one policy are compared
the way policies are: on the same request sets, in the same pass, in shuffled order (an A/B
of two checkouts run one after the other cannot separate a change from the drift between
passes). KEY is a speculation knob the router takes live through `user_config`; a label
without it runs with the knob's default (SpeculationConfig's), sent with every switch so a
variant never leaks into the next run.
"""
from __future__ import annotations

__all__ = ["VARIANT_KEYS", "parse_label", "switch_config"]

# speculation knobs user_config switches live (specserve_ray/user_config.py); the drafter
# is the sweep's own axis (--drafter, recorded in every run), not a variant.
VARIANT_KEYS = ("yield_to_prompts", "prompt_lookup_min", "prompt_lookup_max")


def _value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low)
    except ValueError:
        return low


def parse_label(label: str) -> tuple[str, dict]:
    """(policy, knobs) of a label; ValueError naming the problem."""
    policy, sep, rest = label.strip().lower().partition("@")
    knobs: dict = {}
    if sep:
        if not rest:
            raise ValueError(f"{label!r}: nothing after '@' (expected KEY=VALUE)")
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not value.strip():
                raise ValueError(f"{label!r}: {item!r} is not KEY=VALUE")
            if key not in VARIANT_KEYS:
                raise ValueError(f"{label!r}: {key!r} is not a live speculation knob "
                                 f"(one of {', '.join(VARIANT_KEYS)})")
            if key in knobs:
                raise ValueError(f"{label!r}: {key!r} given twice")
            knobs[key] = _value(value)
    return policy, knobs


def switch_config(label: str, labels, max_k: int, defaults: dict) -> dict:
    """The user_config that switches to `label`: its policy and max k, its knobs, and for
    every knob another label of the sweep sets, its default (`defaults`)."""
    policy, knobs = parse_label(label)
    used = {key for other in labels for key in parse_label(other)[1]}
    return {"policy": policy, "num_speculative_tokens": max_k,
            **{key: defaults[key] for key in sorted(used - set(knobs))}, **knobs}
