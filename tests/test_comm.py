"""Communication building blocks on one process: flat buffers, the 16-bit MPI sum, the merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daso.comm import (
    FlatBuffer,
    model_state_tensors,
    mpi_buffer,
    mpi_sum,
    optimizer_state_tensors,
    synced_state_tensors,
)
from daso.strategies import merge_stale


def model_with_frozen_layer() -> torch.nn.Module:
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    model[0].requires_grad_(False)
    return model


def test_state_tensors_include_frozen_params_and_bn_statistics_not_counters():
    model = model_with_frozen_layer()
    tensors = model_state_tensors(model)
    names = [
        n
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if t.is_floating_point()
    ]
    assert len(tensors) == len(names) == 8  # 6 params + running_mean + running_var
    assert all(t.is_floating_point() for t in tensors)


def test_synced_state_leaves_frozen_params_and_counters_off_the_wire():
    """The cross-node average moves trainable parameters, then floating-point buffers; the
    frozen first layer (equal everywhere) and num_batches_tracked never cross the wire."""
    model = model_with_frozen_layer()
    tensors, param_numel = synced_state_tensors(model)
    expected = [model[1].weight, model[1].bias, model[2].weight, model[2].bias]
    expected += [model[1].running_mean, model[1].running_var]
    assert len(tensors) == len(expected) and all(a is b for a, b in zip(tensors, expected))
    assert param_numel == 4 + 4 + 8 + 2


def test_flat_buffer_round_trip_is_exact():
    model = model_with_frozen_layer()
    buffer = FlatBuffer(model_state_tensors(model))
    assert buffer.numel == sum(t.numel() for t in model_state_tensors(model))
    original = buffer.pack().clone()
    values = torch.arange(buffer.numel, dtype=torch.float32)
    buffer.unpack(values)
    assert torch.equal(buffer.pack(), values)
    assert torch.equal(model[1].running_var, values[-4:])  # buffers land where they belong
    buffer.unpack(original)
    assert torch.equal(buffer.pack(), original)


def test_optimizer_state_tensors_after_first_step():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert optimizer_state_tensors(optimizer) == []
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert [t.shape for t in optimizer_state_tensors(optimizer)] == [(2, 3), (2,)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mpi_sum_matches_torch_add(dtype):
    datatype, op, native = mpi_sum(dtype)
    a = torch.randn(100_003).to(dtype)
    b = torch.randn(100_003).to(dtype)
    expected = a + b
    inout = b.clone()
    op.Reduce_local(mpi_buffer(a.clone()), mpi_buffer(inout))
    assert torch.equal(inout, expected)
    assert native == (dtype == torch.float32)  # 16-bit: the vectorised torch op


@pytest.mark.parametrize("w", [0, 1, 2, 5])
def test_merge_stale_formula(w):
    local = torch.randn(50)
    mean = torch.randn(50)
    expected = (2 * w * local.double().numpy() + 3 * mean.double().numpy()) / (2 * w + 3)
    out = merge_stale(local.clone(), mean, w, num_nodes=3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
