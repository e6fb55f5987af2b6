"""Tensors on the router <-> worker hop (deployments/wire.py): exact round trips as numpy."""
import pickle

import numpy as np
import pytest
import torch

from deployments.wire import tensor_from_wire, tensor_to_wire


def _round_trip(t: torch.Tensor) -> torch.Tensor:
    return tensor_from_wire(pickle.loads(pickle.dumps(tensor_to_wire(t), protocol=5)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.bool, torch.uint8])
def test_values_dtype_and_shape_survive(dtype):
    t = (torch.randn(3, 4, 5) * 100).to(dtype)
    back = _round_trip(t)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8) if dtype == torch.bool else back,
                       t.view(torch.uint8) if dtype == torch.bool else t)


def test_views_scalars_and_empty_tensors():
    base = torch.arange(24).reshape(4, 6)
    for t in (base.t(), base[:, ::2], torch.tensor(7), torch.empty(2, 0, dtype=torch.long),
              torch.ones(3, requires_grad=True) * 2):
        back = _round_trip(t)
        assert back.shape == t.shape and back.dtype == t.dtype
        assert torch.equal(back, t.detach())


def test_arrival_owns_writable_memory():
    wire = tensor_to_wire(torch.arange(5))
    frozen = wire[0].copy()
    frozen.flags.writeable = False            # as Ray hands out a zero-copy buffer
    back = tensor_from_wire((frozen, wire[1]))
    back[0] = 42                              # no warning, no write into the buffer
    assert frozen[0] == 0 and back[0] == 42


def test_the_wire_form_is_numpy_not_a_torch_pickle():
    head, dtype = tensor_to_wire(torch.zeros(2, 4, dtype=torch.long))
    assert isinstance(head, np.ndarray) and dtype == "int64"
