"""Published weight deltas (YuLan-Chat-1, ...): merged = base + delta, tensor by tensor.

A delta may have more vocabulary rows than its base (added tokens); those rows are taken from
the delta as they are. Every other shape must agree.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from .hf import TensorSource


class DeltaSource:
    """A TensorSource yielding base + delta for every tensor of the delta checkpoint."""

    def __init__(self, base: TensorSource, delta: TensorSource):
        self.base = base
        self.delta = delta
        self._base_names = set(base.names())

    def names(self) -> list[str]:
        return self.delta.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.delta.shape(name)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._base_names:
            raise CheckpointError(f"the delta has tensor {name!r} but the base checkpoint does not")
        delta = self.delta.read(name).to(torch.float32)
        base = self.base.read(name).to(torch.float32)
        if delta.shape == base.shape:
            return delta + base
        if delta.dim() == base.dim() and delta.shape[1:] == base.shape[1:] and delta.shape[0] > base.shape[0]:
            merged = delta.clone()
            merged[: base.shape[0]] += base  # rows beyond the base vocabulary come from the delta alone
            return merged
        raise CheckpointError(
            f"tensor {name!r}: delta shape {tuple(delta.shape)} does not fit base shape {tuple(base.shape)}")
