"""16-bit and quantized linears on a GPU, one Triton kernel per call.

The kernel reads the weight bytes as the file stores them and widens them in registers with
fastllm's formula (`quant.Dequantizer`'s scale and offset), so a decode step reads 2, 1 or 0.5
bytes per weight; a prefill widens blocks of rows with the same formula for cuBLAS. The torch-op
path instead widens blocks of rows into float32 buffers at every call, several passes over 4
bytes per weight (bench/HISTORY.md, "Triton linears"). Activations and sums stay float32 (no
TF32), as on the CPU. Used where Triton imports and the weight lives on a CUDA device
(FLM_KERNELS=reference: the torch-op path); tests run the same kernels on the CPU through
Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from ..quant import INT16_INPUT_DTYPES, Dequantizer, DType, Quantized, round_input_int16
from ..settings import setting

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: GPUs fall back to the reference path
    triton = None

GEMV_ROWS = 16  # up to this many input rows: one program per block of outputs and x row (4-bit: rows)
GEMV_BLOCK = (16, 128)  # (outputs, inputs) per GEMV tile
GEMV_WARPS = 4
GEMV_SHARED_ROWS = 8  # 4-bit weights, 2 to GEMV_ROWS input rows: up to this many per program
WIDEN_BLOCK = (32, 128)  # (rows, columns) per tile widened for a prefill GEMM
WIDEN_ROWS = 4096  # weight rows widened to float32 at a time for a prefill GEMM
BITS = {DType.INT8: 8, DType.INT4: 4, DType.INT4_NOZERO: 4, DType.INT4_GROUP: 4}


def available() -> bool:
    """Triton imports and FLM_KERNELS=reference does not ask for the plain-PyTorch path."""
    return triton is not None and setting("FLM_KERNELS") != "reference"


def supports(weight: torch.Tensor | Quantized, shape: tuple[int, int]) -> bool:
    """16-bit and quantized weights; 4-bit ones with rows of whole bytes (an even length, as
    every int4 writer makes them)."""
    if isinstance(weight, torch.Tensor):
        return weight.dtype in (torch.float16, torch.bfloat16)
    return weight.dtype in BITS and (BITS[weight.dtype] == 8 or shape[1] % 2 == 0)


if triton is not None:

    @triton.jit
    def _scale_offset(scale_ptr, offset_ptr, rows, cols, inside, N, GROUPS,
                      GROUPED: tl.constexpr, GROUP_CNT: tl.constexpr):
        """The scale and offset (zero or min) of the weights at [rows, cols]: per row or per group."""
        if GROUPED:
            channel = rows.to(tl.int64) * GROUPS + cols // GROUP_CNT
            scale = tl.load(scale_ptr + channel, mask=inside, other=0.0)
            offset = tl.load(offset_ptr + channel, mask=inside, other=0.0)
        else:
            scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
            offset = tl.load(offset_ptr + rows, mask=rows < N, other=0.0)
        return scale, offset

    @triton.jit
    def _dequantized(q, scale, offset, WITH_ZERO: tl.constexpr):
        """Codes q (float32) to weights: scale * (q - zero) or min + scale * q."""
        if WITH_ZERO:
            return scale * (q - offset)
        return offset + scale * q

    @triton.jit
    def _scaled(q, scale_ptr, offset_ptr, rows, cols, inside, N, GROUPS,
                WITH_ZERO: tl.constexpr, GROUPED: tl.constexpr, GROUP_CNT: tl.constexpr):
        """Codes q (float32) at [rows, cols] to weights, per row or per group; zero outside the
        matrix."""
        scale, offset = _scale_offset(scale_ptr, offset_ptr, rows, cols, inside, N, GROUPS, GROUPED, GROUP_CNT)
        return tl.where(inside, _dequantized(q, scale, offset, WITH_ZERO), 0.0)

    @triton.jit
    def _weight_tile(w_ptr, scale_ptr, offset_ptr, rows, start, N, K, GROUPS,
                     BITS: tl.constexpr, WITH_ZERO: tl.constexpr, GROUPED: tl.constexpr,
                     GROUP_CNT: tl.constexpr, BLOCK_K: tl.constexpr):
        """16- or 8-bit weights [rows, start:start + BLOCK_K] in float32, zero outside."""
        cols = start + tl.arange(0, BLOCK_K)[None, :]
        inside = (rows < N) & (cols < K)
        stored = tl.load(w_ptr + rows.to(tl.int64) * K + cols, mask=inside, other=0).to(tl.float32)
        if BITS == 16:
            w = stored
        else:
            w = _scaled(stored, scale_ptr, offset_ptr, rows, cols, inside, N, GROUPS, WITH_ZERO, GROUPED, GROUP_CNT)
        return w

    @triton.jit
    def _nibble_tiles(w_ptr, scale_ptr, offset_ptr, rows, pairs, N, K, GROUPS,
                      WITH_ZERO: tl.constexpr, GROUPED: tl.constexpr, GROUP_CNT: tl.constexpr):
        """4-bit weights at columns 2 * pairs (high nibbles) and 2 * pairs + 1 (low), in float32,
        from whole bytes loaded side by side (loading each code's byte separately could not be
        vectorised)."""
        inside = (rows < N) & (2 * pairs < K)
        byte = tl.load(w_ptr + rows.to(tl.int64) * (K // 2) + pairs, mask=inside, other=0)
        high = _scaled((byte >> 4).to(tl.float32), scale_ptr, offset_ptr, rows, 2 * pairs, inside, N, GROUPS,
                       WITH_ZERO, GROUPED, GROUP_CNT)
        low = _scaled((byte & 15).to(tl.float32), scale_ptr, offset_ptr, rows, 2 * pairs + 1, inside, N, GROUPS,
                      WITH_ZERO, GROUPED, GROUP_CNT)
        return high, low

    @triton.jit
    def _code_tiles(w_ptr, scale_ptr, offset_ptr, rows, pairs, first, N, K, GROUPS,
                    WITH_ZERO: tl.constexpr, GROUPED: tl.constexpr, GROUP_CNT: tl.constexpr,
                    PER_SLICE: tl.constexpr):
        """The 4-bit weights of `rows` at columns 2 * pairs (high nibbles) and 2 * pairs + 1 (low)
        in float32; with PER_SLICE one scale and offset per slice, the slice's first column
        `first`, loaded once instead of per code (bench/HISTORY.md, "Final Triton revision")."""
        if PER_SLICE:
            byte = tl.load(w_ptr + rows.to(tl.int64) * (K // 2) + pairs, mask=(rows < N) & (2 * pairs < K), other=0)
            scale, offset = _scale_offset(scale_ptr, offset_ptr, rows, first, (rows < N) & (first < K),
                                          N, GROUPS, GROUPED, GROUP_CNT)
            high = _dequantized((byte >> 4).to(tl.float32), scale, offset, WITH_ZERO)
            low = _dequantized((byte & 15).to(tl.float32), scale, offset, WITH_ZERO)
        else:
            high, low = _nibble_tiles(w_ptr, scale_ptr, offset_ptr, rows, pairs, N, K, GROUPS,
                                      WITH_ZERO, GROUPED, GROUP_CNT)
        return high, low

    @triton.jit
    def _int16_steps(x_ptr, ms, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """_int16_step for the input rows ms."""
        top = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)[None, :]
            x = tl.load(x_ptr + ms.to(tl.int64)[:, None] * K + cols, mask=(ms[:, None] < M) & (cols < K), other=0.0)
            top = tl.maximum(top, tl.abs(x))
        top_all = tl.max(top, axis=1)
        return tl.where(top_all > 0, tl.math.div_rn(top_all, 32767.0), 1.0)

    @triton.jit
    def _int16_step(x_row, K, BLOCK_K: tl.constexpr):
        """round_input_int16's step for one input row: max|x| / 32767, or 1 for a row of zeros
        (division rounded to nearest, as torch divides; Triton's `/` may not be)."""
        top = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            top = tl.maximum(top, tl.abs(tl.load(x_row + cols, mask=cols < K, other=0.0)))
        top_all = tl.max(top, axis=0)
        return tl.where(top_all > 0, tl.math.div_rn(top_all, 32767.0), 1.0)

    @triton.jit
    def _on_int16_grid(x, step):
        """step * round(x / step), halves to even as torch.round: adding and taking away 1.5 *
        2**23 leaves a float32 below 2**22 rounded to an integer (|x / step| <= 32767 here)."""
        return ((tl.math.div_rn(x, step) + 12582912.0) - 12582912.0) * step

    @triton.jit
    def _gemv(x_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, N, K, GROUPS,
              BITS: tl.constexpr, WITH_ZERO: tl.constexpr, GROUPED: tl.constexpr, GROUP_CNT: tl.constexpr,
              ROUND_INPUT: tl.constexpr, PER_SLICE: tl.constexpr, SLICE: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[m, block] for input row m = program 1: elementwise products summed at the end. With
        ROUND_INPUT (int4) each program rounds x's row as round_input_int16 does, in registers,
        where rounding it beforehand took five more torch kernels per call (bench/HISTORY.md,
        "Final Triton revision")."""
        outputs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = outputs[:, None]
        x_row = x_ptr + tl.program_id(1).to(tl.int64) * K
        if BITS == 4:
            # a tile as [outputs, slices, pairs of codes], SLICE columns per slice (_code_tiles)
            if ROUND_INPUT:
                step = _int16_step(x_row, K, BLOCK_K)
            rows3 = outputs[:, None, None]
            slices = tl.arange(0, BLOCK_K // SLICE)[None, :, None]
            acc = tl.zeros([BLOCK_N, BLOCK_K // SLICE, SLICE // 2], dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                pairs = start // 2 + slices * (SLICE // 2) + tl.arange(0, SLICE // 2)[None, None, :]
                even = tl.load(x_row + 2 * pairs, mask=2 * pairs < K, other=0.0)
                odd = tl.load(x_row + 2 * pairs + 1, mask=2 * pairs < K, other=0.0)
                if ROUND_INPUT:
                    even, odd = _on_int16_grid(even, step), _on_int16_grid(odd, step)
                high, low = _code_tiles(w_ptr, scale_ptr, offset_ptr, rows3, pairs, start + slices * SLICE, N, K,
                                        GROUPS, WITH_ZERO, GROUPED, GROUP_CNT, PER_SLICE)
                acc += high * even + low * odd
            acc = tl.sum(acc, axis=2)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)[None, :]
                x = tl.load(x_row + cols, mask=cols < K, other=0.0)
                acc += x * _weight_tile(w_ptr, scale_ptr, offset_ptr, rows, start, N, K, GROUPS,
                                        BITS, WITH_ZERO, GROUPED, GROUP_CNT, BLOCK_K)
        tl.store(y_ptr + tl.program_id(1).to(tl.int64) * N + outputs, tl.sum(acc, axis=1), mask=outputs < N)

    @triton.jit
    def _gemv_shared(x_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, M, N, K, GROUPS,
                     WITH_ZERO: tl.constexpr, GROUPED: tl.constexpr, GROUP_CNT: tl.constexpr,
                     ROUND_INPUT: tl.constexpr, PER_SLICE: tl.constexpr, SLICE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """_gemv's 4-bit products for BLOCK_M input rows per program: each tile of codes widened
        once for all of them, where one program per row widened it once per row (bench/HISTORY.md,
        "4-bit batches on a GPU"). The logits move within 2e-4 of their range (the sums' order)."""
        outputs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        x_rows = x_ptr + ms.to(tl.int64)[:, None, None, None] * K
        live = ms[:, None, None, None] < M
        if ROUND_INPUT:
            step = _int16_steps(x_ptr, ms, M, K, BLOCK_M, BLOCK_K)[:, None, None, None]
        rows4 = outputs[None, :, None, None]
        slices = tl.arange(0, BLOCK_K // SLICE)[None, None, :, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K // SLICE, SLICE // 2], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            pairs = start // 2 + slices * (SLICE // 2) + tl.arange(0, SLICE // 2)[None, None, None, :]
            even = tl.load(x_rows + 2 * pairs, mask=live & (2 * pairs < K), other=0.0)
            odd = tl.load(x_rows + 2 * pairs + 1, mask=live & (2 * pairs < K), other=0.0)
            if ROUND_INPUT:
                even, odd = _on_int16_grid(even, step), _on_int16_grid(odd, step)
            high, low = _code_tiles(w_ptr, scale_ptr, offset_ptr, rows4, pairs, start + slices * SLICE, N, K,
                                    GROUPS, WITH_ZERO, GROUPED, GROUP_CNT, PER_SLICE)
            acc += high * even + low * odd
        y = tl.sum(tl.sum(acc, axis=3), axis=2)
        tl.store(y_ptr + ms.to(tl.int64)[:, None] * N + outputs[None, :], y,
                 mask=(ms[:, None] < M) & (outputs[None, :] < N))

    @triton.jit
    def _widen(w_ptr, scale_ptr, offset_ptr, out_ptr, first, N, K, GROUPS,
               BITS: tl.constexpr, WITH_ZERO: tl.constexpr, GROUPED: tl.constexpr, GROUP_CNT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows first..N of the weight in float32 into out [N - first, K]."""
        rows = first + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        start = tl.program_id(1) * BLOCK_K
        if BITS == 4:  # spliced into one tile: two stores at stride 2 were slower
            pairs = start // 2 + tl.arange(0, BLOCK_K // 2)[None, :]
            high, low = _nibble_tiles(w_ptr, scale_ptr, offset_ptr, rows, pairs, N, K, GROUPS,
                                      WITH_ZERO, GROUPED, GROUP_CNT)
            w = tl.interleave(high, low)
        else:
            w = _weight_tile(w_ptr, scale_ptr, offset_ptr, rows, start, N, K, GROUPS,
                             BITS, WITH_ZERO, GROUPED, GROUP_CNT, BLOCK_K)
        cols = start + tl.arange(0, BLOCK_K)[None, :]
        tl.store(out_ptr + (rows - first).to(tl.int64) * K + cols, w, mask=(rows < N) & (cols < K))


class TritonWeight:
    """A weight as the kernels read it: the stored tensor (16-bit values or packed codes) and,
    for quantized ones, the per-row or per-group scale and offset."""

    def __init__(self, weight: torch.Tensor | Quantized, shape: tuple[int, int]):
        self.out_features, self.in_features = shape
        if not supports(weight, shape):
            raise ValueError(f"the Triton kernels do not read this weight ({getattr(weight, 'dtype', None)}, {shape})")
        if isinstance(weight, torch.Tensor):
            self.data = weight.contiguous()
            self.scale = self.offset = self.data  # unread
            self.bits, self.with_zero, self.grouped, self.group_cnt, self.groups = 16, False, False, 1, 1
            self.rounds_input = False
            return
        self.dequantizer = Dequantizer(weight, shape)
        self.data, self.scale, self.offset = weight.data.reshape(-1), self.dequantizer.scale, self.dequantizer.offset
        self.bits, self.with_zero = BITS[weight.dtype], self.dequantizer.with_zero
        self.grouped = weight.dtype == DType.INT4_GROUP
        self.group_cnt, self.groups = (weight.group_cnt, weight.group) if self.grouped else (1, 1)
        self.rounds_input = weight.dtype in INT16_INPUT_DTYPES

    def dense(self) -> torch.Tensor:
        if self.bits == 16:
            return self.data.to(torch.float32)
        return self.dequantizer.rows(0, self.out_features)


def _slices(weight: TritonWeight, block_k: int) -> dict:
    """How the 4-bit GEMV cuts a BLOCK_K-wide tile: per-row weights and groups of a power of two
    into slices of one scale each (a group, or the whole tile); other group sizes per code."""
    if not weight.grouped:
        return dict(PER_SLICE=True, SLICE=block_k)
    group = weight.group_cnt
    if group >= 2 and group & (group - 1) == 0:
        return dict(PER_SLICE=True, SLICE=min(group, block_k))
    return dict(PER_SLICE=False, SLICE=block_k)


def triton_product(x: torch.Tensor, weight: TritonWeight, input_rounded: bool = False) -> torch.Tensor:
    """x [rows, in_features] (float32) times the weight, as [rows, out_features] float32. Input
    rows of int4 weights are rounded as `round_input_int16` says, like every int4 path, unless
    the caller did (`input_rounded`). Up to GEMV_ROWS rows one kernel reads the stored weight
    (and rounds x itself); more rows (a prefill) widen blocks of weight rows with the same
    formula for cuBLAS's float32 GEMM, which runs several times faster there than Triton's exact
    float32 dot (measured on an H200: 11.6 vs 3.1 T multiply-adds/s)."""
    flat = x.contiguous()
    m, n, k = flat.shape[0], weight.out_features, weight.in_features
    rounds = weight.rounds_input and not input_rounded
    common = (weight.data, weight.scale, weight.offset)
    layout = dict(WITH_ZERO=weight.with_zero, GROUPED=weight.grouped, GROUP_CNT=weight.group_cnt)
    if m <= GEMV_ROWS:
        y = torch.empty((m, n), dtype=torch.float32, device=flat.device)
        block_n, block_k = GEMV_BLOCK
        tiling = dict(ROUND_INPUT=rounds, **_slices(weight, block_k), BLOCK_N=block_n, BLOCK_K=block_k,
                      num_warps=GEMV_WARPS)
        if weight.bits == 4 and m > 1:
            block_m = min(GEMV_SHARED_ROWS, triton.next_power_of_2(m))
            _gemv_shared[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
                flat, *common, y, m, n, k, weight.groups, BLOCK_M=block_m, **tiling, **layout)
        else:
            _gemv[(triton.cdiv(n, block_n), m)](flat, *common, y, n, k, weight.groups, BITS=weight.bits, **tiling,
                                                **layout)
        return y
    if rounds:
        flat = round_input_int16(flat)
    outs = []
    block_n, block_k = WIDEN_BLOCK
    for first in range(0, n, WIDEN_ROWS):
        last = min(first + WIDEN_ROWS, n)
        rows = torch.empty((last - first, k), dtype=torch.float32, device=flat.device)
        _widen[(triton.cdiv(last - first, block_n), triton.cdiv(k, block_k))](
            *common, rows, first, last, k, weight.groups,
            BLOCK_N=block_n, BLOCK_K=block_k, BITS=weight.bits, **layout)
        outs.append(torch.nn.functional.linear(flat, rows))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
