"""A GPU decode step's attention in two Triton kernels instead of about twenty torch ops.

In a CUDA graph's one-token step every op is a kernel of a few microseconds, and the step's
time is their count, not the bytes it reads (the 1.1B model replayed ~1,000 kernels per token
at 1-9% of an H200's bandwidth). Per layer, `rotary_store` turns the q/k/v projection row into
a rotated query and writes the rotated key and the value into the cache at the position (it
replaced the split, both rotate-halfs, the cos/sin lookups and the cache writes), and
`decode_attention` runs softmax(q k^T / sqrt(d)) v over the cache up to the position, in
blocks with a running maximum (it replaced the two matmuls, the scale, the mask and the
softmax, and it reads only the visible slots where the torch step covered the whole cache).
Both read the position from a device tensor, so one recorded graph serves every step.
Float32 throughout, the formulas of `rope.apply_rotary` and `model._single_query_attention`;
tests compare them through Triton's interpreter on the CPU.
"""

from __future__ import annotations

import torch

from .triton_linear import available, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rotary_store(qkv_ptr, cos_ptr, sin_ptr, position_ptr, q_out_ptr, keys_ptr, values_ptr, capacity,
                      HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, HALF_BLOCK: tl.constexpr):
        """Program h < HEADS rotates query head h into q_out; program HEADS + j rotates key head
        j into keys[j, position] and copies value head j into values[j, position]."""
        head = tl.program_id(0)
        pos = tl.load(position_ptr)
        half = DIM // 2
        i = tl.arange(0, HALF_BLOCK)
        inside = i < half
        cos1 = tl.load(cos_ptr + pos * DIM + i, mask=inside, other=0.0)
        cos2 = tl.load(cos_ptr + pos * DIM + half + i, mask=inside, other=0.0)
        sin1 = tl.load(sin_ptr + pos * DIM + i, mask=inside, other=0.0)
        sin2 = tl.load(sin_ptr + pos * DIM + half + i, mask=inside, other=0.0)
        if head < HEADS:
            src = qkv_ptr + head * DIM
            dst = q_out_ptr + head * DIM
        else:
            kv_head = head - HEADS
            src = qkv_ptr + (HEADS + kv_head) * DIM
            dst = keys_ptr + (kv_head * capacity + pos) * DIM
            v_src = qkv_ptr + (HEADS + KV_HEADS + kv_head) * DIM
            v_dst = values_ptr + (kv_head * capacity + pos) * DIM
            tl.store(v_dst + i, tl.load(v_src + i, mask=inside), mask=inside)
            tl.store(v_dst + half + i, tl.load(v_src + half + i, mask=inside), mask=inside)
        x1 = tl.load(src + i, mask=inside, other=0.0)
        x2 = tl.load(src + half + i, mask=inside, other=0.0)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        tl.store(dst + i, x1 * cos1 + (-x2) * sin1, mask=inside)
        tl.store(dst + half + i, x2 * cos2 + x1 * sin2, mask=inside)

    @triton.jit
    def _decode_attention(q_ptr, keys_ptr, values_ptr, position_ptr, out_ptr, capacity, window, scale,
                          GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
        """One query head per program over its KV head's slots first..position (first > 0 only
        under a sliding window), BLOCK_L slots at a time with a running maximum and sum."""
        head = tl.program_id(0)
        kv_head = head // GROUP
        pos = tl.load(position_ptr)
        first = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
        d = tl.arange(0, BLOCK_D)
        in_dim = d < DIM
        q = tl.load(q_ptr + head * DIM + d, mask=in_dim, other=0.0)
        k_base = keys_ptr + kv_head * capacity * DIM
        v_base = values_ptr + kv_head * capacity * DIM
        top = tl.zeros([1], dtype=tl.float32) - float("inf")
        total = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(first, pos + 1, BLOCK_L):
            slots = start + tl.arange(0, BLOCK_L)
            seen = slots <= pos
            tile = seen[:, None] & in_dim[None, :]
            k = tl.load(k_base + slots[:, None] * DIM + d[None, :], mask=tile, other=0.0)
            scores = tl.where(seen, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=0))
            weights = tl.exp(scores - new_top)
            shrink = tl.exp(top - new_top)
            v = tl.load(v_base + slots[:, None] * DIM + d[None, :], mask=tile, other=0.0)
            total = total * shrink + tl.sum(weights, axis=0)
            acc = acc * shrink + tl.sum(weights[:, None] * v, axis=0)
            top = new_top
        tl.store(out_ptr + head * DIM + d, acc / total, mask=in_dim)


BLOCK_SLOTS = 32  # cache slots per attention block


def applies(device: torch.device) -> bool:
    """The fused step runs where the Triton linears do: Triton imports and the model is on a GPU."""
    return available() and device.type == "cuda"


def rotary_store(qkv: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, position: torch.Tensor,
                 keys: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv [q heads + 2 kv heads times head_dim] float32 of one token; cos/sin tables [capacity,
    head_dim]; keys/values [1, kv_heads, capacity, head_dim] float32. Writes the rotated key and
    the value at `position` ([1], on the device); returns the rotated query [heads, head_dim]."""
    _, kv_heads, capacity, dim = keys.shape
    qkv = qkv.reshape(-1).contiguous()
    assert qkv.numel() == (heads + 2 * kv_heads) * dim and keys.is_contiguous() and values.is_contiguous()
    q = torch.empty(heads, dim, device=qkv.device, dtype=torch.float32)
    _rotary_store[(heads + kv_heads,)](qkv, cos_table, sin_table, position, q, keys, values, capacity,
                                       HEADS=heads, KV_HEADS=kv_heads, DIM=dim,
                                       HALF_BLOCK=triton.next_power_of_2(dim // 2))
    return q


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
                     window: int | None) -> torch.Tensor:
    """q [heads, head_dim] over the cache slots up to `position` (the last `window` of them with
    a sliding window): attention [heads, head_dim]."""
    heads, dim = q.shape
    _, kv_heads, capacity, _ = keys.shape
    out = torch.empty_like(q)
    _decode_attention[(heads,)](q, keys, values, position, out, capacity, window or 0, dim ** -0.5,
                                GROUP=heads // kv_heads, DIM=dim, BLOCK_D=triton.next_power_of_2(dim),
                                BLOCK_L=BLOCK_SLOTS)
    return out
