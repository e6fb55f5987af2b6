"""Core decoding building blocks (sampling, speculative verification glue)."""
