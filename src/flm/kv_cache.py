"""One sequence's keys and values: the only place their memory is made, grown or read from.

Per layer, keys and values are [kv_heads, capacity, head_dim] tensors on the model's device, in
the cache's dtype: float32, float16 or bfloat16 (the values rounded as torch rounds them), or
int8, each row of head_dim values (one head at one position) stored as round(x / s) with its own
scale s = max|x| / 127 in [kv_heads, capacity] float32 tensors beside (llama.cpp's q8_0 cache
keeps a scale per 32 values; per head row keeps the rows whole for the kernels).

The cache starts small and doubles on demand up to `max_len` (the context window), so a short
chat never holds a whole window. A backend writes a step's keys and values into the slots at
`length` onwards (through `store`, or its kernel writing into `layer_tensors`) and the backend
base class then advances `length`; growing replaces the tensors, so nobody keeps them across
calls.
"""

from __future__ import annotations

import torch

from .config import KV_CACHE_DTYPES, ModelConfig
from .errors import ContextOverflowError, FlmError

KV_DTYPES = {name: getattr(torch, name) for name in KV_CACHE_DTYPES}
INT8_LEVELS = 127.0  # int8 rows: codes -127..127, scale max|x| / 127


def kv_dtype(name: str) -> torch.dtype:
    """The torch dtype of a KV cache dtype's name, or a typed error listing the choices."""
    if name not in KV_DTYPES:
        raise FlmError(f"unknown KV cache dtype {name!r}; choose one of {', '.join(KV_DTYPES)}")
    return KV_DTYPES[name]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and scales of rows x [..., head_dim]: s = max|x| / 127 (1 for a row of zeros),
    codes round(x / s), ties to even, as every backend's kernels compute them."""
    top = x.abs().amax(dim=-1)
    scale = torch.where(top > 0, top / torch.full_like(top, INT8_LEVELS), torch.ones_like(top))
    return torch.round(x / scale[..., None]).to(torch.int8), scale


class KVCache:
    INITIAL = 512  # slots before the first growth, when the caller does not say

    def __init__(self, cfg: ModelConfig, max_len: int, device: str | torch.device = "cpu", initial: int | None = None,
                 dtype: torch.dtype = torch.float32):
        self.max_len = max_len
        self.dtype = dtype
        self.capacity = min(max_len, initial or self.INITIAL)
        shape = (cfg.num_key_value_heads, self.capacity, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        scaled = dtype == torch.int8
        # int8 rows' scales, [kv_heads, capacity] float32 per layer (empty otherwise)
        self.key_scales = [torch.ones(shape[:2], device=device) for _ in layers] if scaled else []
        self.value_scales = [torch.ones(shape[:2], device=device) for _ in layers] if scaled else []
        self.length = 0  # slots holding a token

    def reserve(self, needed: int) -> None:
        """Grow (doubling, up to max_len) so that `needed` tokens fit."""
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise ContextOverflowError(f"{needed} tokens do not fit in the context window of {self.max_len} tokens")
        capacity = min(self.max_len, max(needed, 2 * self.capacity))
        for store in (self.keys, self.values, self.key_scales, self.value_scales):
            for i, old in enumerate(store):
                grown = old.new_zeros(old.shape[0], capacity, *old.shape[2:])
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown
        self.capacity = capacity

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [kv_heads, n, head_dim] (float32) at slots length.. of `layer`;
        returns the layer's keys and values up to and including them in float32, as stored (so
        that a prompt attends to the same rounded values its later steps read)."""
        end = self.length + keys.shape[1]
        for rows, scales, new in ((self.keys, self.key_scales, keys), (self.values, self.value_scales, values)):
            if scales:
                rows[layer][:, self.length:end], scales[layer][:, self.length:end] = quantize_rows(new)
            else:
                rows[layer][:, self.length:end] = new
        return self.stored(layer, end)

    def stored(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values of slots ..end in float32."""
        if self.dtype == torch.int8:
            return tuple(rows[layer][:, :end].float() * scales[layer][:, :end, None]
                         for rows, scales in ((self.keys, self.key_scales), (self.values, self.value_scales)))
        return self.keys[layer][:, :end].float(), self.values[layer][:, :end].float()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values + self.key_scales + self.value_scales)
