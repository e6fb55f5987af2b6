"""Fast paths for the step loop's hot spots, each a drop-in for a function in
`specserve_ray.core` and each held to it by a parity test (tests/test_kernels_parity.py).

The math itself lives in `specserve_ray.core` (rejection sampling, ragged packing and
their loop references); this package holds only faster ways to compute the same thing.
"""

from .greedy import greedy_verify

__all__ = ["greedy_verify"]
