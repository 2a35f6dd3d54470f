"""Flat buffers: many tensors packed into one preallocated contiguous vector.

A cross-node sync hands MPI one buffer instead of one message per tensor (bucketing into a
single bucket). The buffer is allocated once; :meth:`FlatBuffer.pack` and
:meth:`FlatBuffer.unpack` copy in place, so no memory is allocated per batch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import torch


def model_state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every floating-point parameter and buffer of ``module``, each once, in a fixed order.

    Frozen parameters (``requires_grad=False``) are included, so that packing and unpacking
    always agree on the layout. Integer buffers (BatchNorm's ``num_batches_tracked``) are left
    out: they are counters, not state to average.

    Returns:
        Tensors in ``named_parameters()`` then ``named_buffers()`` order, shared duplicates once.
    """
    seen: set[int] = set()
    tensors: list[torch.Tensor] = []
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    return tensors


def synced_state_tensors(module: torch.nn.Module) -> tuple[list[torch.Tensor], int]:
    """The state a cross-node model average moves: trainable parameters, then floating-point
    buffers (BatchNorm running statistics), each once.

    Frozen parameters (``requires_grad=False``) are identical on every rank by construction and
    never cross the wire; integer buffers are counters, not state to average.

    Returns:
        ``(tensors, param_numel)``: the tensors in ``named_parameters()`` then
        ``named_buffers()`` order, and the number of parameter elements at the front of their
        flat layout (an outer optimizer steps those; buffers take the plain mean).
    """
    seen: set[int] = set()
    params: list[torch.Tensor] = []
    buffers: list[torch.Tensor] = []
    for tensor in module.parameters():
        if tensor.is_floating_point() and tensor.requires_grad and id(tensor) not in seen:
            seen.add(id(tensor))
            params.append(tensor)
    for tensor in module.buffers():
        if tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            buffers.append(tensor)
    return params + buffers, sum(t.numel() for t in params)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Floating-point state tensors of ``optimizer`` (momentum buffers, Adam moments), in order.

    Scalar step counters are left out (they agree on every rank). The list is empty before the
    first ``optimizer.step()`` of optimizers that create their state lazily.
    """
    tensors: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim():
                    tensors.append(value)
    return tensors


@functools.lru_cache(maxsize=64)
def shard_bounds(numel: int, shards: int) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` of ``shards`` contiguous, near-equal pieces of ``range(numel)``
    (cached: blocking averages ask for the same split every batch)."""
    edges = [round(i * numel / shards) for i in range(shards + 1)]
    return tuple(zip(edges[:-1], edges[1:]))


class FlatBuffer:
    """A preallocated vector holding copies of ``tensors`` back to back.

    Args:
        tensors: the tensors to mirror (any shapes, floating-point dtypes, one device).
        dtype: dtype of the flat vector (default float32; copies convert).
        device: device of the flat vector (default: that of the first tensor).

    Attributes:
        flat: the vector, shape ``[numel]``, where ``numel`` is the sum of the tensors' sizes.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        self.tensors = list(tensors)
        if device is None:
            device = self.tensors[0].device if self.tensors else torch.device("cpu")
        sizes = [t.numel() for t in self.tensors]
        self.flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
        self._views = list(self.flat.split(sizes)) if sizes else []

    @property
    def numel(self) -> int:
        """Number of elements."""
        return self.flat.numel()

    @property
    def nbytes(self) -> int:
        """Size of :attr:`flat` in bytes."""
        return self.flat.numel() * self.flat.element_size()

    @torch.no_grad()
    def pack(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Copy the tensors (or ``tensors``, same shapes and order) into :attr:`flat`."""
        for view, tensor in zip(self._views, tensors if tensors is not None else self.tensors):
            view.copy_(tensor.reshape(-1))
        return self.flat

    @torch.no_grad()
    def unpack(
        self,
        source: torch.Tensor | None = None,
        tensors: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Copy ``source`` (default :attr:`flat`, shape ``[numel]``) back into the tensors
        (or into ``tensors``, same shapes and order)."""
        if source is not None and source is not self.flat:
            self.flat.copy_(source)
        for view, tensor in zip(self._views, tensors if tensors is not None else self.tensors):
            tensor.copy_(view.view_as(tensor))

    def matches(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Whether ``tensors`` are the very tensors this buffer mirrors (same objects, order)."""
        tensors = list(tensors)
        return len(tensors) == len(self.tensors) and all(
            a is b for a, b in zip(tensors, self.tensors)
        )
