"""An independent numpy rendition of fastllm's torch2flm byte layout and formulas, written
from the spec for the tests (it shares no code with flm): it builds fastllm-style .flm files
and the exact bytes fastllm's writer gives, and dequantizes the way fastllm's C++ reads."""

from __future__ import annotations

import math
import struct

import numpy as np


def s_int(v: int) -> bytes:
    return struct.pack("<i", v)


def s_str(text: str) -> bytes:
    raw = text.encode()
    return s_int(len(raw)) + raw


def int8_payload(w: np.ndarray) -> bytes:
    """fastllm write_int8: code 3, axis 0, (-absmax, absmax) per row, uint8 data."""
    w = w.astype(np.float32)
    c_max = np.expand_dims(np.abs(w).max(axis=-1), -1).clip(0.1, 1e100)
    c_scale = c_max / 127.0
    q = (w / c_scale + 128.5).clip(1, 255).astype(np.uint8)
    out = s_int(3) + s_int(0)
    for i in range(c_max.shape[0]):
        out += struct.pack("<ff", -c_max[i][0], c_max[i][0])
    return out + q.tobytes()


def _int4_quant(w: np.ndarray):
    c_min = np.expand_dims(w.min(axis=-1), -1)
    c_max = np.expand_dims(w.max(axis=-1), -1)
    c_scale = (c_max - c_min) / 15.0
    c_zero = np.round(0.0 - c_min / c_scale).clip(0, 15)
    c_min = -c_scale * c_zero
    q = ((w - c_min) / c_scale + 0.5).astype(np.int8).clip(0, 15).astype(np.uint8)
    return c_min, c_max, q


def int4_payload(w: np.ndarray) -> bytes:
    """fastllm write_int4 (INT4_NOZERO, code 8)."""
    c_min, c_max, q = _int4_quant(w.astype(np.float32))
    packed = q[:, 0::2] * 16 + q[:, 1::2]
    out = s_int(8) + s_int(0)
    for i in range(c_min.shape[0]):
        out += struct.pack("<ff", c_min[i][0], c_max[i][0])
    return out + packed.astype(np.uint8).tobytes()


def int4g_payload(w: np.ndarray, group_cnt: int) -> bytes:
    """fastllm write_int4g (INT4_GROUP, code 9), including its zero padding of short rows."""
    w = w.astype(np.float32)
    k, m = w.shape
    group = (m - 1) // group_cnt + 1
    pad = group * group_cnt - m
    if pad:
        w = np.concatenate((w, np.zeros([k, pad], dtype=np.float32)), axis=1)
    c_min, c_max, q = _int4_quant(w.reshape(k * group, group_cnt))
    q = q.reshape(k, group * group_cnt)
    if pad:
        q = q[:, :-pad].copy()
    packed = q[:, 0::2] * 16 + q[:, 1::2]
    out = s_int(9) + s_int(0) + s_int(group) + s_int(group_cnt)
    for i in range(c_min.shape[0]):
        out += struct.pack("<ff", c_min[i][0], c_max[i][0])
    return out + packed.astype(np.uint8).tobytes()


def tensor_record(name: str, w: np.ndarray, dtype: str, group_cnt: int = 128) -> bytes:
    head = s_str(name) + s_int(w.ndim) + b"".join(s_int(d) for d in w.shape)
    if dtype == "int8":
        return head + int8_payload(w)
    if dtype == "int4":
        return head + int4_payload(w)
    if dtype == "int4g":
        return head + int4g_payload(w, group_cnt)
    if dtype == "float16":
        return head + s_int(7) + w.astype(np.float16).tobytes()
    if dtype == "bfloat16":  # fastllm's C++ low-bit save keeps a float32's upper half (truncates)
        return head + s_int(1) + (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return head + s_int(0) + w.astype(np.float32).tobytes()


def torch2flm_kv(model) -> dict[str, str]:
    """The key/values fastllm's torch2flm writes for a transformers model: str() of every config
    and generation-config attribute, with only a `rope_scaling` dict flattened (under
    transformers 5 the RoPE settings sit whole in `rope_parameters`)."""
    info = dict(model.config.__dict__)
    if model.generation_config is not None:
        info.update(model.generation_config.__dict__)
    if isinstance(info.get("rope_scaling"), dict):
        for key, value in info.pop("rope_scaling").items():
            info["rope_scaling." + key] = value
    return {str(k): str(v) for k, v in info.items()}


def flm_file(kv: dict[str, str], vocab: list[tuple[bytes, int, float]], tensors: list[bytes],
             version: int = 2, special: list[str] | None = None) -> bytes:
    out = s_int(version)
    if version >= 1:
        out += s_int(len(kv)) + b"".join(s_str(k) + s_str(v) for k, v in kv.items())
    use_score = kv.get("tokenizer_use_score") == "1"
    out += s_int(len(vocab))
    for piece, token_id, score in vocab:
        out += s_int(len(piece)) + b"".join(s_int(b) for b in piece) + s_int(token_id)
        if use_score:
            out += struct.pack("<f", score)
    if kv.get("tokenizer_has_special_tokens") == "1":
        out += s_int(len(special or [])) + b"".join(s_str(t) for t in special or [])
    return out + s_int(len(tensors)) + b"".join(tensors)


# ------------------------------------------------------------ fastllm's C++ reading side

def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def lowbit(mn: float, mx: float, bit: int, no_zero: bool) -> tuple[float, int, float]:
    """LowBitConfig::Reset, scalar, float32 rounding at each step: (scale, zero, min)."""
    mn, mx = f32(min(mn, 0.0)), f32(max(mx, 0.0))
    qmax = float((1 << bit) - 1)
    scale = f32(f32(mx - mn) / qmax)  # C++ float: subtract, round, divide, round
    zero = 0
    if scale != 0:
        initial = f32(0.0 - f32(mn / scale))
        if initial < 0:
            zero = 0
        elif initial > qmax:
            zero = int(qmax)
        else:
            zero = int(math.floor(abs(initial) + 0.5)) * (1 if initial >= 0 else -1)
    if no_zero:
        mn = f32(-scale * zero)
    return scale, zero, mn


def dequant_rows(payload_pairs: list[tuple[float, float]], q: np.ndarray, bit: int, no_zero: bool,
                 group_cnt: int | None = None) -> np.ndarray:
    """Scalar dequantization of q [rows, cols] with one (min, max) per row or per group."""
    rows, cols = q.shape
    out = np.zeros((rows, cols), dtype=np.float32)
    groups = 1 if group_cnt is None else (cols - 1) // group_cnt + 1
    for r in range(rows):
        for c in range(cols):
            g = r * groups + (0 if group_cnt is None else c // group_cnt)
            scale, zero, mn = lowbit(*payload_pairs[g], bit, no_zero)
            out[r, c] = f32(mn + f32(scale * float(q[r, c]))) if no_zero else f32(scale * (float(q[r, c]) - zero))
    return out
