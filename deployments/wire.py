"""How tensors cross the router <-> worker hop: as numpy buffers, not torch pickles.

Ray pickles a torch tensor through `torch.save` (a storage record per tensor): ~170 us to
serialize a step's `DraftOutput` or `StepResult` and as much to load it again, against
~40 / ~11 us as numpy arrays, which Ray ships as out-of-band pickle-5 buffers (measured
on this project's 2-core CPU machine; the messages hold a few [B, K] tensors). Every step
pays it twice (draft -> target, target -> router). Values, dtypes and shapes are kept
exactly: dtypes numpy lacks (bfloat16) travel as their raw bits. Only CPU tensors take
this path; a tensor on an accelerator keeps torch's own pickling (and its device).

Registered per process (Ray's custom serializers are process-local): the router replica
and both worker actors call `install()` when they start.
"""
from __future__ import annotations

import io

import torch

# Dtypes numpy has no type for: shipped as same-width integers, viewed back on arrival.
_BITS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8,
         torch.float8_e5m2: torch.uint8}


def tensor_to_wire(t: torch.Tensor):
    """A tensor -> (numpy array, torch dtype name) or ("torch", bytes) off the CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        buf = io.BytesIO()
        torch.save(t, buf)
        return ("torch", buf.getvalue())
    dtype = t.dtype
    if dtype in _BITS:
        t = t.view(_BITS[dtype])
    return (t.contiguous().numpy(), str(dtype).removeprefix("torch."))


def tensor_from_wire(wire) -> torch.Tensor:
    head, body = wire
    if isinstance(head, str):                 # ("torch", bytes): not a CPU tensor
        return torch.load(io.BytesIO(body), weights_only=True)
    if not head.flags.writeable:     # a zero-copy view of Ray's buffer: own the memory
        head = head.copy()
    t = torch.from_numpy(head)
    dtype = getattr(torch, body)
    return t.view(dtype) if dtype in _BITS else t


def install() -> None:
    """Ship this process's tensors to other Ray processes as numpy (idempotent)."""
    from ray.util import register_serializer

    register_serializer(torch.Tensor, serializer=tensor_to_wire, deserializer=tensor_from_wire)
