"""A GPU decode step's RoPE, cache write and attention in two Triton kernels per layer.

In a CUDA graph's one-token step every op is a kernel of a few microseconds, so the step's time
is their count, not the bytes it reads; in torch ops these parts were about twenty kernels per
layer (bench/HISTORY.md, "Fused decode attention"). Per layer, `rotary_store` turns the q/k/v
projection row into a rotated query and writes the rotated key and the value into the cache at
the position, and `decode_attention` runs softmax(q k^T / sqrt(d)) v over the cache's visible
slots, in blocks with a running maximum. Both read the positions from a device tensor, so one
recorded graph serves every step, and one launch serves a batch of sequences, each at its own
position in its own cache, found through a device table of the caches' addresses
(`CacheAddresses`). Float32 throughout, the formulas of `rope.apply_rotary` and `model.attend`;
the tests compare them through Triton's interpreter on the CPU.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .triton_linear import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _cache_base(addresses_ptr, seq, which: tl.constexpr, ELEMENT: tl.constexpr):
        """Sequence seq's keys (which 0), values (1), key scales (2) or value scales (3) of this
        layer: a pointer from the table to elements of type ELEMENT."""
        return tl.load(addresses_ptr + 4 * seq + which).to(tl.pointer_type(ELEMENT))

    @triton.jit
    def _narrowed(x, KV: tl.constexpr):
        """float32 x as KV, rounded to nearest even as torch rounds it (bfloat16 spelled out in
        integer operations: Triton's interpreter truncates)."""
        if KV == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(KV)

    @triton.jit
    def _store_row(first, second, dst, half, scale_dst, i, inside, KV: tl.constexpr):
        """A head row, its halves first and second (float32, elements i), stored at dst as KV (a
        tl dtype); int8 rows as codes round(x / s), ties to even, s = max|x| / 127 at scale_dst."""
        if KV == tl.int8:
            top = tl.maximum(tl.max(tl.where(inside, tl.abs(first), 0.0), axis=0),
                             tl.max(tl.where(inside, tl.abs(second), 0.0), axis=0))
            s = tl.where(top > 0, top / 127.0, 1.0)
            # adding and taking away 1.5 * 2^23 rounds to the nearest integer, ties to even
            first = (first / s + 12582912.0) - 12582912.0
            second = (second / s + 12582912.0) - 12582912.0
            tl.store(scale_dst, s)
        tl.store(dst + i, _narrowed(first, KV), mask=inside)
        tl.store(dst + half + i, _narrowed(second, KV), mask=inside)

    @triton.jit
    def _rotary_store(qkv_ptr, cos_ptr, sin_ptr, positions_ptr, q_out_ptr, addresses_ptr, capacities_ptr,
                      HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, HALF_BLOCK: tl.constexpr,
                      KV: tl.constexpr):
        """Program (s, h), sequence s: h < HEADS rotates query head h into q_out; h = HEADS + j
        rotates key head j into s's keys[j, position] and copies value head j into its values,
        both stored as KV."""
        seq = tl.program_id(0)
        head = tl.program_id(1)
        pos = tl.load(positions_ptr + seq)
        half = DIM // 2
        i = tl.arange(0, HALF_BLOCK)
        inside = i < half
        cos1 = tl.load(cos_ptr + pos * DIM + i, mask=inside, other=0.0)
        cos2 = tl.load(cos_ptr + pos * DIM + half + i, mask=inside, other=0.0)
        sin1 = tl.load(sin_ptr + pos * DIM + i, mask=inside, other=0.0)
        sin2 = tl.load(sin_ptr + pos * DIM + half + i, mask=inside, other=0.0)
        row = qkv_ptr + seq * (HEADS + 2 * KV_HEADS) * DIM
        src = row + head * DIM  # query heads, then key heads
        x1 = tl.load(src + i, mask=inside, other=0.0)
        x2 = tl.load(src + half + i, mask=inside, other=0.0)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        first = x1 * cos1 + (-x2) * sin1
        second = x2 * cos2 + x1 * sin2
        if head < HEADS:
            dst = q_out_ptr + (seq * HEADS + head) * DIM
            tl.store(dst + i, first, mask=inside)
            tl.store(dst + half + i, second, mask=inside)
        else:
            kv_head = head - HEADS
            slot = kv_head * tl.load(capacities_ptr + seq) + pos
            _store_row(first, second, _cache_base(addresses_ptr, seq, 0, KV) + slot * DIM, half,
                       _cache_base(addresses_ptr, seq, 2, tl.float32) + slot, i, inside, KV)
            v_src = row + (HEADS + KV_HEADS + kv_head) * DIM
            _store_row(tl.load(v_src + i, mask=inside, other=0.0), tl.load(v_src + half + i, mask=inside, other=0.0),
                       _cache_base(addresses_ptr, seq, 1, KV) + slot * DIM, half,
                       _cache_base(addresses_ptr, seq, 3, tl.float32) + slot, i, inside, KV)

    @triton.jit
    def _decode_attention(q_ptr, addresses_ptr, capacities_ptr, positions_ptr, out_ptr, window, scale,
                          HEADS: tl.constexpr, GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_L: tl.constexpr, KV: tl.constexpr):
        """Program (s, h): query head h of sequence s over its KV head's slots first..position
        (first > 0 only under a sliding window), BLOCK_L slots at a time with a running maximum
        and sum; the cache's rows read as KV and widened (int8: times their scales)."""
        seq = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        pos = tl.load(positions_ptr + seq)
        first = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
        d = tl.arange(0, BLOCK_D)
        in_dim = d < DIM
        q = tl.load(q_ptr + (seq * HEADS + head) * DIM + d, mask=in_dim, other=0.0)
        head_slot = kv_head * tl.load(capacities_ptr + seq)
        k_base = _cache_base(addresses_ptr, seq, 0, KV) + head_slot * DIM
        v_base = _cache_base(addresses_ptr, seq, 1, KV) + head_slot * DIM
        top = tl.zeros([1], dtype=tl.float32) - float("inf")
        total = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(first, pos + 1, BLOCK_L):
            slots = start + tl.arange(0, BLOCK_L)
            seen = slots <= pos
            tile = seen[:, None] & in_dim[None, :]
            k = tl.load(k_base + slots[:, None] * DIM + d[None, :], mask=tile, other=0).to(tl.float32)
            v = tl.load(v_base + slots[:, None] * DIM + d[None, :], mask=tile, other=0).to(tl.float32)
            if KV == tl.int8:
                k = k * tl.load(_cache_base(addresses_ptr, seq, 2, tl.float32) + head_slot + slots, mask=seen, other=1.0)[:, None]
                v = v * tl.load(_cache_base(addresses_ptr, seq, 3, tl.float32) + head_slot + slots, mask=seen, other=1.0)[:, None]
            scores = tl.where(seen, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=0))
            weights = tl.exp(scores - new_top)
            shrink = tl.exp(top - new_top)
            total = total * shrink + tl.sum(weights, axis=0)
            acc = acc * shrink + tl.sum(weights[:, None] * v, axis=0)
            top = new_top
        tl.store(out_ptr + (seq * HEADS + head) * DIM + d, acc / total, mask=in_dim)


BLOCK_SLOTS = 32  # cache slots per attention block


class CacheTensors(Protocol):
    """A sequence's KV cache as the kernels read it (kv_cache.KVCache): per layer the keys and
    values [kv_heads, capacity, head_dim] and, for int8 caches, their rows' scales [kv_heads,
    capacity] float32 (empty lists otherwise)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_scales: list[torch.Tensor]
    value_scales: list[torch.Tensor]


ELEMENTS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8"}


class CacheAddresses:
    """Where each sequence's keys and values (and int8 scales) lie, layer by layer, for kernels
    that serve several sequences in one launch although each has its own cache tensors (of its
    own capacity): a device table of their addresses [layers, sequences, 4] and of the
    capacities [sequences]. It holds the caches while kernels that read them may be queued, so
    the addresses stay valid."""

    def __init__(self, caches: list[CacheTensors]):
        """The caches' tensors are contiguous, on the GPU (or on the CPU for Triton's
        interpreter), of one dtype of ELEMENTS."""
        first = caches[0].keys[0]
        self.kv_heads, self.head_dim, self.dtype = first.shape[-3], first.shape[-1], first.dtype
        assert self.dtype in ELEMENTS
        self.held = self._host_tables(caches)
        table, capacities = self.held
        self.table = torch.tensor(table, dtype=torch.int64).transpose(0, 1).contiguous().to(first.device)
        self.capacities = torch.tensor(capacities, dtype=torch.int64).to(first.device)
        self.caches = caches

    @property
    def element(self):
        """The caches' element type for the kernels (a triton.language dtype)."""
        return getattr(tl, ELEMENTS[self.dtype])

    def point_to(self, caches: list[CacheTensors]) -> None:
        """Refill the tables in place with as many other caches (a recorded graph reads them);
        nothing is copied when every address and capacity is the one already there."""
        held = self._host_tables(caches)
        if held != self.held:
            table, capacities = held
            self.table.copy_(torch.tensor(table, dtype=torch.int64).transpose(0, 1))
            self.capacities.copy_(torch.tensor(capacities, dtype=torch.int64))
            self.held = held
        self.caches = caches

    def forget(self) -> None:
        """Let go of the caches once the kernels that read them are queued (a graph kept for the
        next batch of this size would otherwise keep finished sequences' caches alive): the
        allocator hands their memory out again only in that stream's order, after those kernels."""
        self.caches = None

    def _host_tables(self, caches: list[CacheTensors]):
        """([sequences][layers][4] addresses, [sequences] capacities) as Python lists."""
        table = []
        for cache in caches:
            for tensor in cache.keys + cache.values:
                assert tensor.dtype == self.dtype and tensor.is_contiguous()
                assert tensor.shape[-3] == self.kv_heads and tensor.shape[-1] == self.head_dim
            scales = zip(cache.key_scales, cache.value_scales) if cache.key_scales else [(None, None)] * len(cache.keys)
            table.append([[k.data_ptr(), v.data_ptr(), ks.data_ptr() if ks is not None else 0,
                           vs.data_ptr() if vs is not None else 0]
                          for k, v, (ks, vs) in zip(cache.keys, cache.values, scales)])
        return table, [cache.keys[0].shape[-2] for cache in caches]


def rotary_store(qkv: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor,
                 caches: CacheAddresses, layer: int, heads: int) -> torch.Tensor:
    """qkv [sequences, q heads + 2 kv heads times head_dim] float32, one token per sequence;
    cos/sin tables [rows > every position, head_dim]. Writes each sequence's rotated key and its
    value at its position (`positions` [sequences], on the device) into its cache of `layer`, in
    the cache's dtype; returns the rotated queries [sequences, heads, head_dim] (float32)."""
    sequences, kv_heads, dim = caches.capacities.shape[0], caches.kv_heads, caches.head_dim
    qkv = qkv.reshape(sequences, -1).contiguous()
    assert qkv.shape[1] == (heads + 2 * kv_heads) * dim and positions.shape == (sequences,)
    q = torch.empty(sequences, heads, dim, device=qkv.device, dtype=torch.float32)
    _rotary_store[(sequences, heads + kv_heads)](qkv, cos_table, sin_table, positions, q, caches.table[layer],
                                                 caches.capacities, HEADS=heads, KV_HEADS=kv_heads, DIM=dim,
                                                 HALF_BLOCK=triton.next_power_of_2(dim // 2), KV=caches.element)
    return q


def decode_attention(q: torch.Tensor, caches: CacheAddresses, layer: int, positions: torch.Tensor,
                     window: int | None) -> torch.Tensor:
    """q [sequences, heads, head_dim], each sequence over its cache's slots up to its position
    (the last `window` of them with a sliding window): attention [sequences, heads, head_dim]."""
    sequences, heads, dim = q.shape
    out = torch.empty_like(q)
    _decode_attention[(sequences, heads)](q, caches.table[layer], caches.capacities, positions, out, window or 0,
                                          dim ** -0.5, HEADS=heads, GROUP=heads // caches.kv_heads, DIM=dim,
                                          BLOCK_D=triton.next_power_of_2(dim), BLOCK_L=BLOCK_SLOTS, KV=caches.element)
    return out
