"""Linear layers over weights kept in their file dtype, chosen per weight at load time.

`make_linear` picks the fastest implementation available for a weight's dtype and device;
`ReferenceLinear` (dequantize with fastllm's formula, then a float32 matmul) always exists and
the tests compare every fast path against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import (
    FLOAT_DTYPES,
    INT16_INPUT_DTYPES,
    Dequantizer,
    DType,
    Quantized,
    lowbit_params,
    round_input_int16,
)

ROW_CHUNK = 4096  # rows dequantized at a time by the reference path


class Linear:
    """y = x @ W.T (+ b) for x of shape [..., in_features]; float32 in, float32 out."""

    out_features: int
    in_features: int
    # True where the layer rounds x to int4's 16-bit grid itself (round_input_int16) and takes
    # `input_rounded=True` from a caller that did, so that fused parts round it once
    rounds_input: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The float32 weight this layer computes with (for checks and tied embeddings)."""
        raise NotImplementedError

    def rounds_in_kernel(self, rows: int) -> bool:
        """Whether x of this many rows is rounded inside the product's own kernel, so that
        rounding it once beforehand for fused parts would only add work."""
        return False


class FloatLinear(Linear):
    """float32/bfloat16/float16 weights used in place. Activations stay float32 (a bf16/fp16
    weight is widened a block of rows at a time): rounding activations to 16 bits changes
    SmolLM2's greedy output within 32 tokens, widening the weight does not."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight
        self.bias = None if bias is None else bias.to(torch.float32)
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:
            return F.linear(x, self.weight, self.bias)
        y = torch.cat([F.linear(x, self.weight[s: s + ROW_CHUNK].to(torch.float32))
                       for s in range(0, self.out_features, ROW_CHUNK)], dim=-1)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return self.weight.to(torch.float32)


class ReferenceLinear(Linear):
    """Any quantized weight: dequantize a block of rows with fastllm's formula, multiply (int4
    weights: by the input rounded as `round_input_int16` says). Also the GPU path where Triton
    is missing: there the widening runs on the device, a block at a time."""

    def __init__(self, q: Quantized, shape: tuple[int, int], bias: torch.Tensor | None):
        self.dequantizer = Dequantizer(q, shape)
        self.rounds_input = q.dtype in INT16_INPUT_DTYPES
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else bias.to(torch.float32)

    def __call__(self, x: torch.Tensor, input_rounded: bool = False) -> torch.Tensor:
        if self.rounds_input and not input_rounded:
            x = round_input_int16(x)
        outs = [F.linear(x, self.dequantizer.rows(s, min(s + ROW_CHUNK, self.out_features)))
                for s in range(0, self.out_features, ROW_CHUNK)]
        y = torch.cat(outs, dim=-1)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return self.dequantizer.rows(0, self.out_features)


class Int8Linear(Linear):
    """fastllm int8: W = scale * (q - zero) with q in 1..255 and zero 127 or 128 per row.
    Computed as torch's int8 weight-only matmul of (q - 128) plus an exact per-row correction
    scale * (128 - zero) * sum(x), so it equals the reference formula."""

    def __init__(self, q: Quantized, shape: tuple[int, int], bias: torch.Tensor | None):
        scale, zero, _ = lowbit_params(q.mins, q.maxs, 8, no_zero=False)
        self.out_features, self.in_features = shape
        self.signed = (q.data.reshape(shape).to(torch.int16) - 128).to(torch.int8)
        self.scale = scale.contiguous()
        shift = scale * (128.0 - zero)
        self.shift = shift if bool((shift != 0).any()) else None
        self.bias = None if bias is None else bias.to(torch.float32)

    @staticmethod
    def applies() -> bool:
        return hasattr(torch.ops.aten, "_weight_int8pack_mm")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(flat, self.signed, self.scale)
        if self.shift is not None:
            y = y + flat.sum(dim=-1, keepdim=True) * self.shift
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return self.signed.to(torch.float32) * self.scale[:, None] + (self.shift[:, None] if self.shift is not None else 0)


class NativeLinear(Linear):
    """float32/bf16/fp16/int8/int4 weights through the SIMD kernels: float32 activations (int4:
    rounded to 16 bits) and accumulation, up to 256 input rows (KERNEL_ROWS), each weight read
    from memory once per call; longer prompts widen blocks of weight rows to float32 for torch's
    GEMM. On AVX512-BF16 CPUs, prompts on bf16/int8/int4 weights multiply in bf16 instead
    (native_product). The weight bytes are used in place (memory-mapped from the file)."""

    def __init__(self, weight: torch.Tensor | Quantized, shape: tuple[int, int], bias: torch.Tensor | None):
        from .native import NativeParams

        self.params = NativeParams(weight, shape)
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else bias.to(torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = native_product(x, [self.params]).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return self.params.rows(0, self.out_features)


class FusedLinear(Linear):
    """Linears that read the same input (q/k/v, gate/up) as one, outputs side by side. With the
    SIMD kernels a decode step computes all parts in one call (one parallel region instead of
    one per weight) and a prefill writes all parts' GEMMs into one result; otherwise each part
    runs as it would alone, except that parts which round the input to int4's 16-bit grid
    (reference and Triton int4 layers) share one rounding: five torch ops, on a GPU five small
    kernels, instead of one set per part."""

    def __init__(self, parts: list[Linear]):
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        params = [p.params for p in parts if isinstance(p, NativeLinear)]
        self.native = params if len(params) == len(parts) and all(p.compatible(params[0]) for p in params) else None
        given = [p.bias for p in parts if p.bias is not None]
        self.bias = torch.cat([given[0].new_zeros(p.out_features) if p.bias is None else p.bias
                               for p in parts]) if given else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return torch.cat(self._each_part(x), dim=-1)
        y = native_product(x, self.native).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _each_part(self, x: torch.Tensor) -> list[torch.Tensor]:
        rows = x.numel() // self.in_features
        ahead = [p.rounds_input and not p.rounds_in_kernel(rows) for p in self.parts]
        if sum(ahead) < 2:
            return [p(x) for p in self.parts]
        rounded = round_input_int16(x)
        return [p(rounded, input_rounded=True) if early else p(x) for p, early in zip(self.parts, ahead)]

    def dense(self) -> torch.Tensor:
        return torch.cat([p.dense() for p in self.parts])


class TritonLinear(Linear):
    """16-bit and quantized weights on a CUDA device: one Triton kernel reads the stored bytes
    and widens them in registers (see triton_linear)."""

    def __init__(self, weight: torch.Tensor | Quantized, shape: tuple[int, int], bias: torch.Tensor | None):
        from .triton_linear import TritonWeight

        self.weight = TritonWeight(weight, shape)
        self.rounds_input = self.weight.rounds_input
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else bias.to(torch.float32)

    @staticmethod
    def applies(weight: torch.Tensor | Quantized, shape: tuple[int, int]) -> bool:
        from .triton_linear import available, supports

        device = weight.device if isinstance(weight, torch.Tensor) else weight.data.device
        # Triton compiles for compute capability 7.0 (Volta) and later
        return (device.type == "cuda" and available() and supports(weight, shape)
                and torch.cuda.get_device_capability(device) >= (7, 0))

    def __call__(self, x: torch.Tensor, input_rounded: bool = False) -> torch.Tensor:
        from .triton_linear import triton_product

        flat = x.reshape(-1, self.in_features)
        y = triton_product(flat, self.weight, input_rounded).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        return self.weight.dense()

    def rounds_in_kernel(self, rows: int) -> bool:
        from .triton_linear import GEMV_ROWS

        return self.rounds_input and rows <= GEMV_ROWS


def native_product(x: torch.Tensor, parts: list) -> torch.Tensor:
    """x [..., K] times compatible NativeParams, outputs side by side, as [rows, sum of n]: a
    prompt (x [batch, tokens, K] with more than 8 tokens) in bfloat16 where prompt_in_bf16 says
    so; one token of each of several sequences (x [batch, 1, K]) as each alone would be; else the
    SIMD kernel up to KERNEL_ROWS x rows (each weight read once), else float32 GEMMs over widened
    blocks (float32 weights: used as they are)."""
    from .native import KERNEL_ROWS, gemm_product, linear_many, prompt_in_bf16

    flat = x.reshape(-1, x.shape[-1]).contiguous()
    tokens = x.shape[-2] if x.dim() > 2 else 0
    if prompt_in_bf16(parts[0].kind, tokens):
        return linear_many(flat, parts, in_bf16=True)
    if flat.shape[0] <= KERNEL_ROWS or tokens == 1:
        return linear_many(flat, parts, steps=tokens == 1)
    return gemm_product(flat, parts)


def make_linear(weight: torch.Tensor | Quantized, shape: tuple[int, int], bias: torch.Tensor | None = None,
                reference: bool = False) -> Linear:
    """The fastest available Linear for this weight (the reference one when asked)."""
    from .native import NativeParams, native

    if not reference and NativeParams.supports(weight, shape) and native() is not None:
        return NativeLinear(weight, shape, bias)
    if isinstance(weight, Quantized) and weight.dtype in FLOAT_DTYPES:  # 16-bit bytes straight from a file
        data = weight.data.reshape(-1)
        if data.data_ptr() % 2:
            data = data.clone()
        weight = data.view(FLOAT_DTYPES[weight.dtype]).reshape(shape)
    if not reference and TritonLinear.applies(weight, shape):
        return TritonLinear(weight, shape, bias)
    if isinstance(weight, torch.Tensor):
        return FloatLinear(weight, bias)
    if not reference and weight.dtype == DType.INT8 and weight.data.device.type == "cpu" and Int8Linear.applies():
        return Int8Linear(weight, shape, bias)
    return ReferenceLinear(weight, shape, bias)


__all__ = ["FLOAT_DTYPES", "FloatLinear", "FusedLinear", "Int8Linear", "Linear", "NativeLinear", "ReferenceLinear", "TritonLinear",
           "make_linear"]
