"""The GPU's Triton kernels against the reference path, run on the CPU by Triton's interpreter
(conftest sets TRITON_INTERPRET=1 where torch sees no GPU; on a GPU they run compiled there):
every stored weight type, decode- and prefill-sized inputs, groups that pad, fused parts; int4
rows of odd length are declined."""

import pytest
import torch

from helpers import QUANTIZED, fused_rounds_input_once
from flm.kernels import FusedLinear, TritonLinear
from flm.kernels import triton_linear
from flm.kernels.triton_linear import GEMV_ROWS, TritonWeight, supports, triton_product
from flm.quant import DType, Quantized, dequantize, quantize, round_input_int16

pytestmark = pytest.mark.skipif(triton_linear.triton is None, reason="Triton is not installed (pip install triton)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(q: Quantized) -> Quantized:
    return Quantized(q.dtype, q.mins.to(DEVICE), q.maxs.to(DEVICE), q.data.to(DEVICE), q.group, q.group_cnt)


def _product(x: torch.Tensor, q: Quantized | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    weight = TritonWeight(q.to(DEVICE) if isinstance(q, torch.Tensor) else _on_device(q), shape)
    return triton_product(x.to(DEVICE), weight).cpu()


def _weight(name: str, w: torch.Tensor) -> tuple[Quantized | torch.Tensor, torch.Tensor, bool]:
    """(stored weight, float32 reference weight, whether int4 rounds the input)."""
    if name in ("float16", "bfloat16"):
        stored = w.to(getattr(torch, name))
        return stored, stored.float(), False
    if name == "int4_with_zero":  # old fastllm writers' INT4: scale * (q - zero)
        rows, cols = w.shape
        q = Quantized(DType.INT4, w.amin(-1), w.amax(-1), torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8))
    else:
        dtype, group = QUANTIZED[name]
        q = quantize(w, dtype, group)
    return q, dequantize(q, tuple(w.shape)), q.dtype in (DType.INT4_NOZERO, DType.INT4_GROUP)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "int8", "int4", "int4g32", "int4g128", "int4_with_zero"])
@pytest.mark.parametrize("rows", [1, 2, 3, 9, GEMV_ROWS + 1, 40])
def test_triton_linear_equals_reference(name, rows):
    """GEMV up to GEMV_ROWS input rows (4-bit weights: 2 and 3 rows in one program sharing
    each widened tile, 9 over two), tiled GEMM above; 72 outputs and 384 inputs leave partial
    tiles in every direction (384 = 3 groups of 128, 12 of 32)."""
    torch.manual_seed(rows)
    w = torch.randn(72, 384) * 0.05
    stored, dense, rounds = _weight(name, w)
    x = torch.randn(rows, 384)
    want = (round_input_int16(x) if rounds else x) @ dense.T
    got = _product(x, stored, (72, 384))
    assert got.shape == (rows, 72)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_linear_layer_adds_bias_and_keeps_leading_dims():
    torch.manual_seed(3)
    w, bias = torch.randn(40, 64) * 0.05, torch.randn(40)
    q = quantize(w, DType.INT4_GROUP, 32)
    layer = TritonLinear(_on_device(q), (40, 64), bias.to(DEVICE))
    x = torch.randn(2, 3, 64)
    want = round_input_int16(x) @ dequantize(q, (40, 64)).T + bias
    torch.testing.assert_close(layer(x.to(DEVICE)).cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dense().cpu(), dequantize(q, (40, 64)), rtol=0, atol=0)


def test_prefill_widens_the_weight_in_blocks_of_rows(monkeypatch):
    """More input rows than GEMV_ROWS: the weight is widened WIDEN_ROWS rows at a time (here 32,
    so 72 outputs take three blocks, the last partial) for the GEMM."""
    monkeypatch.setattr(triton_linear, "WIDEN_ROWS", 32)
    torch.manual_seed(4)
    w = torch.randn(72, 384) * 0.05
    q = quantize(w, DType.INT4_GROUP, 32)
    x = torch.randn(GEMV_ROWS + 7, 384)
    want = round_input_int16(x) @ dequantize(q, (72, 384)).T
    torch.testing.assert_close(_product(x, q, (72, 384)), want, rtol=1e-5, atol=1e-5)


def test_int4_rows_of_odd_length_stay_on_the_reference_path():
    """Codes are packed over the whole matrix, so with an odd row length every other row would
    start in a low nibble; the kernels read whole bytes per row and decline such weights."""
    q = Quantized(DType.INT4_NOZERO, -torch.rand(9), torch.rand(9), torch.randint(0, 256, (9 * 33 // 2 + 1,), dtype=torch.uint8))
    assert not supports(q, (9, 33)) and supports(q, (9, 34))
    with pytest.raises(ValueError, match="do not read"):
        TritonWeight(q, (9, 33))


def test_padded_groups():
    """fastllm pads a row to whole groups: 80 inputs in groups of 32 use three groups, the last
    one partly."""
    torch.manual_seed(2)
    shape = (10, 80)
    q = Quantized(DType.INT4_GROUP, -torch.rand(30), torch.rand(30), torch.randint(0, 256, (400,), dtype=torch.uint8),
                  group=3, group_cnt=32)
    x = torch.randn(GEMV_ROWS + 4, 80)
    want = round_input_int16(x) @ dequantize(q, shape).T
    torch.testing.assert_close(_product(x, q, shape), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, GEMV_ROWS + 1])
def test_groups_of_other_sizes(rows):
    """Groups of 24 (not a power of two, so the GEMV takes each code's scale on its own rather
    than a slice's) and of 256 (wider than a GEMV tile: one scale for the whole tile)."""
    torch.manual_seed(7)
    for group in (24, 256):
        w = torch.randn(24, 768) * 0.05
        q = quantize(w, DType.INT4_GROUP, group)
        x = torch.randn(rows, 768)
        want = round_input_int16(x) @ dequantize(q, (24, 768)).T
        torch.testing.assert_close(_product(x, q, (24, 768)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, GEMV_ROWS + 1])
def test_fused_int4_parts_round_the_input_once(monkeypatch, rows):
    """q/k/v-style parts on the Triton kernels: a decode-sized x is rounded in each GEMV, a
    prefill's once by torch ops for all int4 parts (counted); the same outputs as each part
    alone; a 16-bit part beside them gets x as it is."""
    torch.manual_seed(5)
    shapes = [(48, 64), (16, 64), (16, 64)]
    ws = [torch.randn(*shape) * 0.05 for shape in shapes]
    qs = [quantize(w, DType.INT4_GROUP, 32) for w in ws[:2]]
    parts = [TritonLinear(_on_device(q), shape, None) for q, shape in zip(qs, shapes)]
    parts.append(TritonLinear(ws[2].to(DEVICE, torch.float16), shapes[2], None))
    x = torch.randn(rows, 64, device=DEVICE)
    got = fused_rounds_input_once(FusedLinear(parts), x, monkeypatch, times=0 if rows <= GEMV_ROWS else 1)
    want = torch.cat([round_input_int16(x.cpu()) @ dequantize(q, shape).T for q, shape in zip(qs, shapes)]
                     + [x.cpu() @ ws[2].half().float().T], dim=-1)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["int4", "int4g32"])
def test_gemv_rounds_the_input_as_torch_does(name):
    """The GEMV's own rounding of x equals round_input_int16 bit for bit: rows with values on
    halves of the grid (to even), a row of zeros, a row whose largest value is negative."""
    torch.manual_seed(6)
    stored, _, _ = _weight(name, torch.randn(40, 256) * 0.05)
    weight = TritonWeight(_on_device(stored), (40, 256))
    x = torch.randn(4, 256)
    x[1] = (torch.arange(256) - 127.5) / 1024  # each on a half of the grid's step, 1 / 1024 ...
    x[1, 0] = -32767.0 / 1024  # ... set by the largest |x|, negative
    x[2] = 0.0
    x = x.to(DEVICE)
    inside = triton_product(x, weight)
    ahead = triton_product(round_input_int16(x), weight, input_rounded=True)
    torch.testing.assert_close(inside, ahead, rtol=0, atol=0)
