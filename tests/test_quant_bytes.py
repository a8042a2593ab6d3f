"""Every dtype's bytes and dequantized values against fastllm's formulas, computed independently."""

import numpy as np
import pytest
import torch

from fastllm_layout import dequant_rows, int4_payload, int4g_payload, int8_payload, lowbit
from flm.quant import DType, Quantized, choose_group_size, dequantize, parse_dtype, quantize
from flm.errors import UnsupportedDtypeError


def _matrix(rows=6, cols=64, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, size=(rows, cols)).astype(np.float32)
    w[1] = np.abs(w[1])  # all positive: min clamps through zero in the reader
    w[2] = -np.abs(w[2])  # all negative
    w[3, :5] = [0.5, -0.5, 0.25, 0.0, 1e-8]
    return w


def _payload(q: Quantized) -> bytes:
    import struct

    head = struct.pack("<ii", int(q.dtype), 0)
    if q.dtype == DType.INT4_GROUP:
        head += struct.pack("<ii", q.group, q.group_cnt)
    pairs = torch.stack([q.mins, q.maxs], dim=1).numpy().astype("<f4").tobytes()
    return head + pairs + q.data.numpy().tobytes()


def test_int8_bytes_match_fastllm():
    w = _matrix()
    assert _payload(quantize(torch.from_numpy(w), DType.INT8)) == int8_payload(w)


def test_int4_bytes_match_fastllm():
    w = _matrix()
    assert _payload(quantize(torch.from_numpy(w), DType.INT4_NOZERO)) == int4_payload(w)


@pytest.mark.parametrize("group", [32, 64])
def test_int4g_bytes_match_fastllm(group):
    w = _matrix(cols=128)
    assert _payload(quantize(torch.from_numpy(w), DType.INT4_GROUP, group)) == int4g_payload(w, group)


def test_hand_computed_int8_row():
    """One row worked by hand: absmax 0.5 -> scale 0.5/127, q = trunc(v/scale + 128.5)."""
    w = torch.tensor([[0.5, -0.5, 0.25, 0.0]])
    q = quantize(w, DType.INT8)
    assert q.data.tolist() == [[255, 1, 192, 128]]
    assert q.mins.tolist() == [-0.5] and q.maxs.tolist() == [0.5]
    # fastllm's reader: scale = float(1.0f/255) = 0.003921569; 0.5f/scale = 127.49999 in float32,
    # so std::round gives zero point 127 (not 128): values come back as (q - 127) * scale.
    scale = np.float32(1.0) / np.float32(255)
    expected = [(v - 127) * float(scale) for v in (255, 1, 192, 128)]
    assert dequantize(q, (1, 4)).tolist()[0] == pytest.approx(expected, rel=1e-6)


def test_hand_computed_int4_row():
    """min -0.3, max 0.45: scale 0.05, zero 6 -> q = trunc((v + 0.3)/0.05 + 0.5), packed high first."""
    w = torch.tensor([[-0.3, 0.45, 0.0, 0.1]])
    q = quantize(w, DType.INT4_NOZERO)
    assert q.data.tolist() == [[0x0F, 0x68]]


def _pairs(q: Quantized):
    return list(zip(q.mins.tolist(), q.maxs.tolist()))


def _unpacked(q: Quantized, rows, cols):
    data = q.data.numpy().reshape(-1)
    vals = np.empty(data.size * 2, dtype=np.uint8)
    vals[0::2], vals[1::2] = data >> 4, data & 0xF
    return vals[: rows * cols].reshape(rows, cols)


@pytest.mark.parametrize("dtype,bit,no_zero,group", [
    (DType.INT8, 8, False, None), (DType.INT4_NOZERO, 4, True, None), (DType.INT4_GROUP, 4, True, 32),
])
def test_dequantize_matches_fastllm_reader(dtype, bit, no_zero, group):
    w = _matrix(cols=64)
    q = quantize(torch.from_numpy(w), dtype, group or 128)
    ours = dequantize(q, w.shape).numpy()
    vals = q.data.numpy() if dtype == DType.INT8 else _unpacked(q, *w.shape)
    theirs = dequant_rows(_pairs(q), vals, bit, no_zero, group)
    np.testing.assert_array_equal(ours, theirs)


def test_quantization_error_within_fastllm_bounds():
    """fastllm's readers recompute scale and zero from the stored (min, max), which can shift a
    int8 row by one step (zero point 127 where the writer used 128) and scale it by 254/255:
    int8 stays within 2 steps, int4 within 1."""
    w = _matrix(rows=16, cols=128)
    span = np.maximum(w.max(axis=1, keepdims=True), 0) - np.minimum(w.min(axis=1, keepdims=True), 0)
    for dtype, levels, steps in ((DType.INT8, 255, 2.0), (DType.INT4_NOZERO, 15, 1.0), (DType.INT4_GROUP, 15, 1.0)):
        q = quantize(torch.from_numpy(w), dtype, 32)
        back = dequantize(q, w.shape).numpy()
        step = np.maximum(np.abs(w).max(axis=1, keepdims=True) * 2, span) / levels
        assert (np.abs(back - w) <= steps * step + 1e-7).all(), dtype


def test_constant_rows_do_not_divide_by_zero():
    w = torch.zeros(3, 32)
    w[1] = 0.7
    for dtype in (DType.INT8, DType.INT4_NOZERO, DType.INT4_GROUP):
        back = dequantize(quantize(w, dtype, 32), (3, 32))
        assert torch.isfinite(back).all()
    assert dequantize(quantize(w, DType.INT4_NOZERO), (3, 32))[0].abs().max() == 0


def test_lowbit_rounding_is_half_away_from_zero():
    # zero point 127.5 rounds to 128 (std::round), not 128 by banker's luck: check 2.5 -> 3
    scale, zero, _ = lowbit(-2.5, 12.5, 4, no_zero=False)
    assert zero == 3


def test_parse_dtype():
    assert parse_dtype("int4g64") == (DType.INT4_GROUP, 64)
    assert parse_dtype("float16") == (DType.FLOAT16, None)
    with pytest.raises(UnsupportedDtypeError, match="unknown dtype"):
        parse_dtype("int3")


def test_group_size_fallback():
    assert choose_group_size(576, 128) == 64
    assert choose_group_size(576, 32) == 32
    assert choose_group_size(1536, 128) == 128
    with pytest.raises(UnsupportedDtypeError):
        choose_group_size(100, 128)


@pytest.mark.parametrize("dtype,bit,no_zero,group", [
    (DType.INT8, 8, False, None), (DType.INT4_NOZERO, 4, True, None), (DType.INT4_GROUP, 4, True, 32),
])
def test_consistent_quantizer_is_read_back_on_its_grid(dtype, bit, no_zero, group):
    """--quantizer consistent: fastllm's own reader (the scalar rendition) rebuilds the writer's
    grid, so every value comes back within half a step."""
    from flm.quant import lowbit_params

    w = _matrix(rows=8, cols=64)
    q = quantize(torch.from_numpy(w), dtype, group or 128, "consistent")
    vals = q.data.numpy() if dtype == DType.INT8 else _unpacked(q, *w.shape)
    theirs = dequant_rows(_pairs(q), vals, bit, no_zero, group)
    np.testing.assert_array_equal(dequantize(q, w.shape).numpy(), theirs)
    scale, _, _ = lowbit_params(q.mins, q.maxs, bit, no_zero)
    per_element = np.repeat(scale.numpy(), group or w.shape[1]).reshape(w.shape)  # one scale per row or group
    assert (np.abs(theirs - w) <= 0.5 * per_element * 1.001 + 1e-7).all()


def test_unknown_quantizer():
    with pytest.raises(UnsupportedDtypeError, match="unknown quantizer"):
        quantize(torch.zeros(2, 32), DType.INT8, 32, "magic")
