"""The one numeric definition of every .flm data type.

Writers follow fastllm's `torch2flm.py` (numpy float32 arithmetic, numpy's round-half-even);
readers follow fastllm's C++ `LowBitConfig` (std::round, min/max clamped through zero). Both
are reproduced step by step in float32 torch ops, which round exactly as numpy and C++ do, so
our bytes and our dequantized values are fastllm's bit for bit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .errors import UnsupportedDtypeError


class DType(enum.IntEnum):
    """fastllm's data-type codes (fastllm.h `enum DataType`)."""

    FLOAT32 = 0
    BFLOAT16 = 1
    INT8 = 3
    INT4 = 4  # int4 with a zero point (old fastllm writers)
    FLOAT16 = 7
    INT4_NOZERO = 8  # per-row int4: value = min + q * scale
    INT4_GROUP = 9  # group-wise int4: value = min + q * scale per group


# Names users type (CLI, tofile, from_hf) -> code. "int4" is fastllm's per-row INT4_NOZERO.
DTYPE_NAMES: dict[str, DType] = {
    "float32": DType.FLOAT32,
    "bfloat16": DType.BFLOAT16,
    "float16": DType.FLOAT16,
    "int8": DType.INT8,
    "int4": DType.INT4_NOZERO,
    "int4g": DType.INT4_GROUP,
}

FLOAT_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}
GROUP_SIZES = (32, 64, 128)


def parse_dtype(name: str) -> tuple[DType, int | None]:
    """Parse a dtype name; `int4g` may carry its group size as fastllm spells it (`int4g64`)."""
    key = str(name).strip().lower()
    if key.startswith("int4g") and key[5:].isdigit():
        return DType.INT4_GROUP, int(key[5:])
    if key not in DTYPE_NAMES:
        raise UnsupportedDtypeError(
            f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)} (int4g may be written int4g32/int4g64/int4g128)"
        )
    return DTYPE_NAMES[key], None


def dtype_code(value: int) -> DType:
    try:
        return DType(value)
    except ValueError:
        raise UnsupportedDtypeError(f"unknown .flm data type code {value}") from None


def choose_group_size(row_length: int, requested: int) -> int:
    """Largest of 32/64/128 (not above `requested`) that divides the row; fastllm pads instead."""
    for size in sorted((s for s in GROUP_SIZES if s <= requested), reverse=True):
        if row_length % size == 0:
            return size
    raise UnsupportedDtypeError(
        f"int4g needs a row length divisible by 32, got {row_length}; use int4 or int8 for this model"
    )


@dataclass
class Quantized:
    """A quantized matrix as stored in a .flm: per-channel (min, max) pairs and packed bytes."""

    dtype: DType
    mins: torch.Tensor  # float32 [channels]
    maxs: torch.Tensor  # float32 [channels]
    data: torch.Tensor  # uint8, row-major
    group: int = 1  # groups per row (INT4_GROUP only)
    group_cnt: int = 0  # elements per group (INT4_GROUP only)


# ---------------------------------------------------------------- writers (fastllm torch2flm)

def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte, the even element in the high nibble."""
    return (q[:, 0::2] * 16 + q[:, 1::2]).to(torch.uint8)


def quantize_int8(w: torch.Tensor) -> Quantized:
    """torch2flm write_int8: symmetric per row, stored as (-absmax, absmax)."""
    w = w.to(torch.float32)
    c_max = w.abs().amax(dim=-1, keepdim=True).clamp(0.1, float("inf"))
    c_scale = c_max / 127.0
    q = (w / c_scale + 128.5).clamp(1, 255).to(torch.uint8)
    return Quantized(DType.INT8, -c_max[:, 0], c_max[:, 0].clone(), q.contiguous())


def _int4_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch2flm's int4 rounding on each row of `w`: returns (stored min, max, q in 0..15)."""
    c_min = w.amin(dim=-1, keepdim=True)
    c_max = w.amax(dim=-1, keepdim=True)
    c_scale = (c_max - c_min) / 15.0
    flat = c_scale == 0  # a constant row: numpy would divide by zero; keep it exact instead
    safe_scale = torch.where(flat, torch.ones_like(c_scale), c_scale)
    c_zero = torch.round(0.0 - c_min / safe_scale).clamp(0, 15)
    c_min_q = torch.where(flat, c_min, -c_scale * c_zero)
    q = ((w - c_min_q) / safe_scale + 0.5).to(torch.int8).clamp(0, 15)
    q = torch.where(flat, torch.zeros_like(q), q)
    return c_min_q[:, 0], c_max[:, 0], q.to(torch.uint8)


def quantize_int4(w: torch.Tensor) -> Quantized:
    """torch2flm write_int4 (INT4_NOZERO): per-row min/max with a zero snapped to the grid."""
    w = w.to(torch.float32)
    if w.shape[-1] % 2:
        raise UnsupportedDtypeError(f"int4 needs an even row length, got {w.shape[-1]}")
    mins, maxs, q = _int4_rows(w)
    return Quantized(DType.INT4_NOZERO, mins, maxs, _pack_nibbles(q).contiguous())


def quantize_int4_group(w: torch.Tensor, group_cnt: int) -> Quantized:
    """torch2flm write_int4g (INT4_GROUP) for rows that `group_cnt` divides."""
    w = w.to(torch.float32)
    rows, cols = w.shape
    if cols % group_cnt:
        raise UnsupportedDtypeError(f"group size {group_cnt} does not divide row length {cols}")
    group = cols // group_cnt
    mins, maxs, q = _int4_rows(w.reshape(rows * group, group_cnt))
    packed = _pack_nibbles(q.reshape(rows, cols))
    return Quantized(DType.INT4_GROUP, mins, maxs, packed.contiguous(), group, group_cnt)


# ---------------------------------------------------------------- consistent writers (opt-in)
#
# fastllm's reader rebuilds scale and zero point from the stored (min, max), and for fastllm's
# own writer that rebuild differs from what the writer quantized with (int8: zero point 127 on
# about half the rows; int4: a rescaled grid). These writers store (min, max) chosen so that the
# unchanged reader rebuilds exactly the grid the weights were quantized on. Files stay readable
# by fastllm; only the stored ranges (and for int4 some nibbles) differ from fastllm's writer.

def quantize_int8_consistent(w: torch.Tensor) -> Quantized:
    """fastllm's int8 bytes, with ranges (-128 s, 127 s) so that the reader's zero point is 128."""
    q = quantize_int8(w)
    scale = q.maxs / 127.0
    return Quantized(DType.INT8, -128.0 * scale, 127.0 * scale, q.data)


def _int4_rows_consistent(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 16-level grid containing zero (the only grids the reader can express) that covers the row."""
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0.0)
    span = hi - lo
    zero = torch.round(-lo / torch.where(span == 0, torch.ones_like(span), span) * 15.0).clamp(0, 15)
    up = torch.where(zero < 15, hi / (15.0 - zero).clamp(min=1.0), torch.zeros_like(hi))
    down = torch.where(zero > 0, -lo / zero.clamp(min=1.0), torch.zeros_like(lo))
    scale = torch.maximum(up, down)
    flat = scale == 0
    safe = torch.where(flat, torch.ones_like(scale), scale)
    grid_min = -scale * zero
    q = torch.round((w - grid_min) / safe).clamp(0, 15).to(torch.uint8)
    q = torch.where(flat, torch.zeros_like(q), q)
    return grid_min[:, 0], (grid_min + 15.0 * scale)[:, 0], q


def quantize_consistent(w: torch.Tensor, dtype: DType, group_cnt: int = 128) -> Quantized:
    w = w.to(torch.float32)
    if dtype == DType.INT8:
        return quantize_int8_consistent(w)
    rows, cols = w.shape
    if cols % 2:
        raise UnsupportedDtypeError(f"int4 needs an even row length, got {cols}")
    if dtype == DType.INT4_NOZERO:
        mins, maxs, q = _int4_rows_consistent(w)
        return Quantized(dtype, mins, maxs, _pack_nibbles(q).contiguous())
    if dtype == DType.INT4_GROUP:
        if cols % group_cnt:
            raise UnsupportedDtypeError(f"group size {group_cnt} does not divide row length {cols}")
        group = cols // group_cnt
        mins, maxs, q = _int4_rows_consistent(w.reshape(rows * group, group_cnt))
        return Quantized(dtype, mins, maxs, _pack_nibbles(q.reshape(rows, cols)).contiguous(), group, group_cnt)
    raise UnsupportedDtypeError(f"{dtype.name} is not a quantized type")


QUANTIZERS = ("fastllm", "consistent")


def quantize(w: torch.Tensor, dtype: DType, group_cnt: int = 128, method: str = "fastllm") -> Quantized:
    """`method` "fastllm": fastllm's torch2flm bytes exactly; "consistent": see above."""
    if method == "consistent":
        return quantize_consistent(w, dtype, group_cnt)
    if method != "fastllm":
        raise UnsupportedDtypeError(f"unknown quantizer {method!r}; choose one of {', '.join(QUANTIZERS)}")
    if dtype == DType.INT8:
        return quantize_int8(w)
    if dtype == DType.INT4_NOZERO:
        return quantize_int4(w)
    if dtype == DType.INT4_GROUP:
        return quantize_int4_group(w, group_cnt)
    raise UnsupportedDtypeError(f"{dtype.name} is not a quantized type")


# ---------------------------------------------------------------- readers (fastllm LowBitConfig)

def lowbit_params(mins: torch.Tensor, maxs: torch.Tensor, bit: int, no_zero: bool):
    """fastllm LowBitConfig::Reset in float32: returns (scale, zero_point, min) per channel."""
    qmax = float((1 << bit) - 1)
    lo = torch.clamp(mins.to(torch.float32), max=0.0)
    hi = torch.clamp(maxs.to(torch.float32), min=0.0)
    scale = (hi - lo) / qmax
    with torch.no_grad():
        initial = 0.0 - lo / scale  # float32, as in C++
        x = initial.to(torch.float64)
        rounded = torch.sign(x) * torch.floor(x.abs() + 0.5)  # std::round: half away from zero
        zero = torch.where(initial < 0, torch.zeros_like(x), torch.where(initial > qmax, torch.full_like(x, qmax), rounded))
        zero = torch.nan_to_num(zero, nan=0.0).to(torch.float32)
    if no_zero:
        lo = -scale * zero
    return scale, zero, lo


def _unpack_nibbles(data: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Elements first..first+count of fastllm's packed sequence (high nibble first), as uint8."""
    lo, hi = first // 2, (first + count + 1) // 2
    part = data.reshape(-1)[lo:hi]
    out = torch.stack((part >> 4, part & 0xF), dim=-1).reshape(-1)
    skip = first - 2 * lo
    return out[skip: skip + count]


class Dequantizer:
    """fastllm's dequantization of one stored matrix, its per-row (or per-group) scale and
    offset computed once: `rows(start, stop)` gives those rows in float32 on the data's device.
    The reference path and GPUs widen blocks of rows with it at every call, so it does per
    element only the formula's own two operations (no per-element index tensors)."""

    def __init__(self, q: Quantized, shape: tuple[int, int]):
        if q.dtype not in (DType.INT8, DType.INT4, DType.INT4_NOZERO, DType.INT4_GROUP):
            raise UnsupportedDtypeError(f"{q.dtype.name} is not a quantized type")
        self.q = q
        self.in_features = shape[1]
        # INT8/INT4: scale * (q - zero); INT4_NOZERO/INT4_GROUP: min + scale * q
        self.with_zero = q.dtype in (DType.INT8, DType.INT4)
        # on the CPU, whatever the data's device: CUDA divides by a constant as a multiplication by
        # its reciprocal, which moved int8 zero points of 127.5 from 128 to 127 on a GPU
        scale, zero, lo = lowbit_params(q.mins.cpu(), q.maxs.cpu(), 8 if q.dtype == DType.INT8 else 4, not self.with_zero)
        device = q.data.device
        self.scale, self.offset = scale.to(device), (zero if self.with_zero else lo).to(device)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        n, cols = stop - start, self.in_features
        if self.q.dtype == DType.INT8:
            vals = self.q.data.reshape(-1)[start * cols: stop * cols].reshape(n, cols)
        else:
            vals = _unpack_nibbles(self.q.data, start * cols, n * cols).reshape(n, cols)
        vals = vals.to(torch.float32)
        if self.q.dtype == DType.INT4_GROUP:
            # element j of a row uses group j // group_cnt; fastllm pads a row to group * group_cnt
            groups, per = self.q.group, self.q.group_cnt
            padded = torch.nn.functional.pad(vals, (0, groups * per - cols)).view(n, groups, per)
            scale = self.scale[start * groups: stop * groups].view(n, groups, 1)
            offset = self.offset[start * groups: stop * groups].view(n, groups, 1)
            return (offset + scale * padded).view(n, groups * per)[:, :cols]
        scale, offset = self.scale[start:stop, None], self.offset[start:stop, None]
        return scale * (vals - offset) if self.with_zero else offset + scale * vals


def dequantize(q: Quantized, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 values fastllm computes from stored bytes (reference for every kernel)."""
    return Dequantizer(q, shape).rows(0, shape[0])


# ---------------------------------------------------------------- what int4 linears multiply

INT16_INPUT_DTYPES = (DType.INT4_NOZERO, DType.INT4_GROUP)


def round_input_int16(x: torch.Tensor) -> torch.Tensor:
    """The input an INT4_NOZERO / INT4_GROUP linear multiplies: each row of x on a 16-bit grid,
    s * round(x / s) with s = max|x| / 32767 (a row of zeros stays zero). The CPU kernels then
    sum codes times these integers exactly in int32, at about twice the float32 path's rate;
    the rounding moves each value by at most 1/65534 of its row's largest (fastllm rounds its
    int4 linears' input to 8 bits). Every int4 path (kernels, prefill, reference) applies it."""
    top = x.abs().amax(dim=-1, keepdim=True)
    # a tensor divisor: CUDA turns division by a Python number into a multiplication by its
    # reciprocal, a last-bit difference from the CPU's s
    scale = torch.where(top > 0, top / torch.full_like(top, 32767.0), torch.ones_like(top))
    return torch.round(x / scale) * scale


def quantized_nbytes(dtype: DType, rows: int, cols: int) -> int:
    """Bytes of packed data fastllm's GetBytes gives for a [rows, cols] tensor."""
    count = rows * cols
    if dtype == DType.INT8:
        return count
    return (count + 1) // 2
