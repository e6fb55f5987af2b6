"""SpecServe kernels: pure tensor ops for speculative verification.

Vectorized implementations live in ``rejection`` and ``ragged``; ``reference``
holds plain loop versions that tests compare them against.
"""

from .ragged import RaggedBatch, gather_last, pack_ragged, positions_and_mask, unpad
from .rejection import PLACEHOLDER_TOKEN_ID, rejection_sample

__all__ = [
    "PLACEHOLDER_TOKEN_ID",
    "RaggedBatch",
    "gather_last",
    "pack_ragged",
    "positions_and_mask",
    "rejection_sample",
    "unpad",
]
