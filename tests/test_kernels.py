"""The SIMD kernels (AVX-512 or AVX2, whichever this CPU has) against the reference path, for
every weight type, decode-sized and prefill-sized inputs, and odd group layouts."""

import pytest
import torch

from helpers import QUANTIZED, fused_rounds_input_once, kernel_weights
from flm.kernels import NativeLinear, ReferenceLinear, make_linear
from flm.kernels.native import cpu_isa, native
from flm.quant import INT16_INPUT_DTYPES, DType, Quantized, quantize, round_input_int16

needs_native = pytest.mark.skipif(cpu_isa() is None, reason="CPU has neither AVX-512 nor AVX2+FMA+F16C")

@needs_native
def test_native_module_builds_on_this_cpu():
    assert native() is not None, "the SIMD kernels failed to build (see the log)"


@needs_native
@pytest.mark.parametrize("name", ["bfloat16", "float16", *QUANTIZED])
@pytest.mark.parametrize("rows", [1, 5, 8, 13, 40, 64, 65, 200, 300, 520])
def test_native_linear_equals_reference(name, rows):
    """Every path: the kernel (one pass per weight tile up to 8 rows, cache-sized blocks beyond,
    up to KERNEL_ROWS = 256; int4 from as many rows as a group has elements: widened
    blocks), then GEMMs over widened blocks of 256 weight rows (300 = two blocks)."""
    torch.manual_seed(rows)
    out_features, in_features = 300, 384  # 384 = 3 groups of 128, 12 of 32
    w = torch.randn(out_features, in_features) * 0.05
    weight, dense = kernel_weights(name, w)
    bias = torch.randn(out_features)
    lin = make_linear(weight, (out_features, in_features), bias)
    assert isinstance(lin, NativeLinear)
    x = torch.randn(rows, in_features)
    rounds = name in QUANTIZED and QUANTIZED[name][0] in INT16_INPUT_DTYPES
    expected = (round_input_int16(x) if rounds else x).double() @ dense.double().T + bias.double()
    got = lin(x)
    assert got.shape == (rows, out_features)
    tolerance = 1e-5 * float(expected.abs().max()) + 1e-5
    assert float((got.double() - expected).abs().max()) <= tolerance
    # the kernels dequantize with one fused multiply-add, the reference rounds twice
    torch.testing.assert_close(lin.dense(), dense, rtol=1e-6, atol=1e-6 * float(dense.abs().max()))


@needs_native
@pytest.mark.parametrize("name", ["bfloat16", "float16", "int8", "float32"])
@pytest.mark.parametrize("in_features", [416, 1152, 2080, 5152])
def test_one_input_row_reads_rows_in_order_or_in_tiles(name, in_features):
    """One x row against 16-bit or int8 rows of any length, or float32 rows of up to 1024
    elements (linear_simd.cpp's reads_in_order), walks the weights row after row, 64 columns per
    step (on AVX-512, bf16 and int8 in split loads with x reordered); 416, 2080 and 5152 leave a
    tail of 32 columns, read in element order; longer float32 rows go through the eight-row
    tiles. Rows past 5120 columns go four at a time (45 rows: a last one alone), each summed
    exactly as when it is the only row."""
    torch.manual_seed(in_features)
    w = torch.randn(45, in_features) * 0.05
    weight, dense = kernel_weights(name, w)
    lin = make_linear(weight, (45, in_features))
    assert isinstance(lin, NativeLinear)
    x = torch.randn(1, in_features) * 3
    expected = x.double() @ dense.double().T
    got = lin(x)
    assert float((got.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    for row in (0, 3, 44):
        alone, _ = kernel_weights(name, w[row:row + 1])
        assert torch.equal(make_linear(alone, (1, in_features))(x)[0, 0], got[0, row]), row


@needs_native
@pytest.mark.parametrize("name", ["float16", *QUANTIZED])
def test_blocked_kernel_sums_spans_of_k(name):
    """Past 8 x rows the kernel walks K in spans of 2048 (KC) and carries each output's raw sum
    from span to span, applying scales and shifts after the last; 4736 = 2 spans + 640, and per-row
    int4's single group (4736) crosses both span ends and its 4096-element int32 chunk. Group-wise
    int4 on at least a group's length of rows widens spans of 512 (9 + 128 here): 40 and 131 rows
    for groups of 32, 131 for 128. 50 weight rows and odd row counts leave partial tiles."""
    from flm.kernels.native import linear_many

    torch.manual_seed(11)
    out_features, in_features = 50, 4736
    w = torch.randn(out_features, in_features) * 0.05
    weight, dense = kernel_weights(name, w)
    lin = make_linear(weight, (out_features, in_features))
    assert isinstance(lin, NativeLinear)
    x = torch.randn(131, in_features)
    rounds = name in QUANTIZED and QUANTIZED[name][0] in INT16_INPUT_DTYPES
    expected = (round_input_int16(x) if rounds else x).double() @ dense.double().T
    for rows in (9, 40, 131):
        got = linear_many(x[:rows].contiguous(), [lin.params]).double()
        assert float((got - expected[:rows]).abs().max()) <= 1e-5 * float(expected.abs().max()) + 1e-5


@needs_native
@pytest.mark.parametrize("name, in_features", [("int4", 8352), ("int4g32", 8320), ("int4g128", 8320)])
def test_int4_batch_rows_equal_each_row_alone_bit_for_bit(name, in_features):
    """A served batch decodes its sequences together (int4_tile_few_x, one token of each:
    x [B, 1, K], the decode step's linear_raw(steps=true), any B) while a request alone takes the
    one-row path (int4_tile_one_x; per-row int4 rows this long four at a time, shorter ones one at
    a time in int4_row_sum's eight chains): both sum in one order, so greedy answers cannot depend
    on who else is being served (past 8
    rows a prompt's blocks would sum long rows in other spans). 8352 columns: per-row int4 sums two
    4096-blocks and a tail of 160 (a 128-code pass and a 32); 65 groups of 128 leave a tail
    after eight-group vectors. 37 weight rows: tiles of 4, 2 and 1 (AVX-512)."""
    torch.manual_seed(11)
    w = torch.randn(37, in_features) * 0.05
    weight, _ = kernel_weights(name, w)
    lin = make_linear(weight, (37, in_features))
    assert isinstance(lin, NativeLinear)
    x = torch.randn(16, in_features)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(16)])
    for rows in (2, 3, 5, 8):
        assert torch.equal(lin(x[:rows]), alone[:rows]), rows
    for rows in (9, 16):
        assert torch.equal(lin(x[:rows, None]).reshape(rows, 37), alone[:rows]), rows


@needs_native
@pytest.mark.parametrize("dtype, group, in_features", [(DType.INT4_NOZERO, 128, 5632), (DType.INT4_GROUP, 8192, 16384)])
def test_int4_rows_longer_than_one_int32_chunk(dtype, group, in_features):
    """int4 sums a row in int32 chunks of at most 4096 codes that never cross a group's end: a
    per-row int4 row of 5632 (the 1.1B model's down projection) ends inside its second chunk;
    groups of 8192 (a layout fastllm files may carry) each take two chunks and their own scale.
    One x row and a batch."""
    torch.manual_seed(7)
    w = torch.randn(24, in_features) * 0.05
    q = quantize(w, dtype, group)
    lin = make_linear(q, (24, in_features))
    assert isinstance(lin, NativeLinear)
    x = torch.randn(3, in_features)
    expected = round_input_int16(x).double() @ ReferenceLinear(q, (24, in_features), None).dense().double().T
    for rows in (1, 3):
        got = lin(x[:rows]).double()
        assert float((got - expected[:rows]).abs().max()) <= 1e-5 * float(expected.abs().max()) + 1e-5


def test_int4_input_rounds_each_row_to_16_bits():
    x = torch.randn(3, 256)
    x[1] = 0.0
    x[2, 7] = -50.0  # an outlier sets its row's grid
    got = round_input_int16(x)
    step = x.abs().amax(dim=-1, keepdim=True) / 32767
    assert torch.equal(got[1], x[1])
    assert float(((got - x).abs() - step / 2).max()) <= 1e-6 * float(step.max())
    ticks = got[[0, 2]] / step[[0, 2]]
    assert torch.allclose(ticks, ticks.round(), atol=1e-3) and float(ticks.abs().max()) <= 32767.01
    assert not torch.equal(got[0], x[0])  # it does round


@needs_native
def test_native_reads_16bit_bytes_at_odd_addresses():
    """16-bit weights straight from a file can start at an odd byte offset."""
    w = torch.randn(64, 96).to(torch.float16)
    raw = torch.empty(w.numel() * 2 + 1, dtype=torch.uint8)
    raw[1:] = w.reshape(-1).view(torch.uint8)
    q = Quantized(DType.FLOAT16, torch.empty(0), torch.empty(0), raw[1:])
    lin = make_linear(q, (64, 96))
    x = torch.randn(3, 96)
    torch.testing.assert_close(lin(x), x @ w.float().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["float16", "int8", "int4g32"])
@pytest.mark.parametrize("rows", [1, 3, 40, 200])
def test_fused_linear_equals_its_parts(name, rows):
    """q/k/v and gate/up run as one call in decode: same outputs, side by side, biases included."""
    from flm.kernels import FusedLinear

    torch.manual_seed(rows)
    sizes = (96, 32, 32)
    parts = []
    for i, out_features in enumerate(sizes):
        weight, _ = kernel_weights(name, torch.randn(out_features, 128) * 0.05)
        parts.append(make_linear(weight, (out_features, 128), torch.randn(out_features) if i == 0 else None))
    fused = FusedLinear(parts)
    x = torch.randn(2, rows, 128)
    expected = torch.cat([p(x) for p in parts], dim=-1)
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    assert fused.out_features == sum(sizes)
    assert (fused.native is not None) == (cpu_isa() is not None)


AVX512 = "avx2 fma f16c avx512f avx512bw avx512vl avx512dq"


@pytest.mark.parametrize("flags, forced, expected", [
    (AVX512 + " avx512_vnni avx512_bf16", "", "avx512bf16"), (AVX512 + " avx512_bf16", "", "avx512"),
    (AVX512 + " avx512_vnni avx512_bf16", "avx512vnni", "avx512vnni"),
    (AVX512 + " avx512_vnni", "", "avx512vnni"), (AVX512, "", "avx512"), ("avx2 fma f16c", "", "avx2"),
    (AVX512 + " avx512_vnni", "avx2", "avx2"), (AVX512, "avx512vnni", None), ("avx2 fma", "", None),
])
def test_cpu_isa_builds_for_the_widest_set_the_cpu_flags_allow(monkeypatch, flags, forced, expected):
    """VNNI and BF16 only where /proc/cpuinfo lists them; FLM_ISA narrows the choice, never widens it."""
    import flm.kernels.native as native_module

    class CpuInfo:
        def __init__(self, path: str):
            assert path == "/proc/cpuinfo"

        def read_text(self) -> str:
            return f"processor\t: 0\nflags\t\t: fpu sse sse2 {flags}\n"

    monkeypatch.setattr(native_module, "Path", CpuInfo)
    monkeypatch.setenv("FLM_ISA", forced)
    isa = cpu_isa()
    assert (isa[0] if isa else None) == expected
    if isa:
        assert ("-mavx512vnni" in isa[1]) == (expected in ("avx512vnni", "avx512bf16"))
        assert ("-mavx512bf16" in isa[1]) == (expected == "avx512bf16")


def test_fused_reference_int4_parts_round_the_input_once(monkeypatch):
    """Parts that round x to int4's 16-bit grid share one rounding (counted); an int8 part
    beside them gets x as it is; outputs equal each part alone."""
    from flm.kernels import FusedLinear

    torch.manual_seed(6)
    kinds = [(DType.INT4_GROUP, 32), (DType.INT4_NOZERO, 128), (DType.INT8, 128)]
    parts = [ReferenceLinear(quantize(torch.randn(24, 64) * 0.05, dtype, group), (24, 64), None)
             for dtype, group in kinds]
    fused_rounds_input_once(FusedLinear(parts), torch.randn(3, 64), monkeypatch)
