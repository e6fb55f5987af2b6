"""Linear layers with weights prepacked once for oneDNN (CPU inference only).

Profiled on the embedded target (fp32, 2 threads, batch 1, context 128): `aten::mm`
is ~80% of a forward, and `F.linear` re-lays-out each weight on every call through a
path that costs 9.7 ms for 1 token but 13.6 ms for 2 and 9 (the matrix-matrix path
re-packs the weights each call). With the weights reordered once into oneDNN's blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`), the same 8 layers + LM head cost
5.2 / 5.5 / 4.6 / 5.6 ms for 1 / 2 / 5 / 9 tokens: one read of the weights whatever
the token count, which is what makes verifying k+1 tokens cost about one step.

Numerics: oneDNN accumulates in its own order, so results differ from `F.linear` in
the last bits (~1e-5 relative). The model is patched in place, so every path that runs
it (engine at any k, Hugging Face `generate` on the same object) sees the same function.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PackedLinear", "prepack_linears", "can_prepack"]

# The batch-size hint oneDNN packs for; measured flat from 1 to 64 rows with 16.
_PACK_HINT_ROWS = 16


def can_prepack(model: nn.Module) -> bool:
    """oneDNN packing helps CPU fp32/bf16 inference; elsewhere keep the stock layers."""
    param = next(model.parameters())
    return (param.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and param.dtype in (torch.float32, torch.bfloat16))


class PackedLinear(nn.Module):
    """Drop-in for an inference-only `nn.Linear`; keeps `.weight` for code that reads it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight            # shared, not copied (tied embeddings stay tied)
        self.bias = linear.bias
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach(), _PACK_HINT_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.dtype != self._packed.dtype or torch.is_grad_enabled():
            return nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def prepack_linears(model: nn.Module, min_features: int = 256) -> int:
    """Replace each `nn.Linear` of `model` with both dimensions >= `min_features` in place;
    returns how many were replaced. Small layers stay stock: on the 128-wide embedded
    draft, oneDNN's per-call overhead made a forward slower (0.93 vs 0.73 ms)."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear
                    and min(child.in_features, child.out_features) >= min_features):
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced
