"""One sequence's keys and values: the only place their memory is made, grown or read from.

Per layer, keys and values are [kv_heads, capacity, head_dim] float32 tensors on the model's
device. The cache starts small and doubles on demand up to `max_len` (the context window), so a
short chat never holds a whole window. A backend writes a step's keys and values into the slots
at `length` onwards (through `store`, or its kernel writing into `layer_tensors`) and the
backend base class then advances `length`; growing replaces the tensors, so nobody keeps them
across calls.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import ContextOverflowError


class KVCache:
    INITIAL = 512  # slots before the first growth, when the caller does not say

    def __init__(self, cfg: ModelConfig, max_len: int, device: str | torch.device = "cpu", initial: int | None = None):
        self.max_len = max_len
        self.capacity = min(max_len, initial or self.INITIAL)
        shape = (cfg.num_key_value_heads, self.capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # slots holding a token

    def reserve(self, needed: int) -> None:
        """Grow (doubling, up to max_len) so that `needed` tokens fit."""
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise ContextOverflowError(f"{needed} tokens do not fit in the context window of {self.max_len} tokens")
        capacity = min(self.max_len, max(needed, 2 * self.capacity))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros(old.shape[0], capacity, old.shape[2])
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown
        self.capacity = capacity

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [kv_heads, n, head_dim] at slots length.. of `layer`; returns the
        layer's keys and values up to and including them."""
        end = self.length + keys.shape[1]
        self.keys[layer][:, self.length:end] = keys
        self.values[layer][:, self.length:end] = values
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
