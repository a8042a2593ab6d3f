"""The GPU decode step's fused kernels (RoPE + cache write, attention) against the torch
formulas, for every KV cache dtype, on a GPU or through Triton's interpreter on the CPU; the
whole step is held to the reference in test_backends."""

from types import SimpleNamespace

import pytest
import torch

from flm.kernels import triton_decode, triton_linear
from flm.kv_cache import quantize_rows
from flm.model import attend
from flm.rope import apply_rotary

needs_triton = pytest.mark.skipif(not triton_linear.available(), reason="Triton is not installed (pip install triton)")


def _stored(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows as a cache of `dtype` holds them, int8 scales or None), as kv_cache stores them."""
    if dtype == torch.int8:
        return quantize_rows(rows)
    return rows.to(dtype), None


def _widened(rows: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    return rows.float() * scales[..., None] if scales is not None else rows.float()


@needs_triton
@pytest.mark.parametrize("kv", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("dim", [16, 24])  # 24: neither half nor whole a power of two (masked lanes)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("position", [0, 3, 31, 32, 39])  # 31/32: the ends of the first block of slots
def test_fused_attention_kernels_equal_torch_formulas(dim, window, position, kv):
    """One launch for three sequences, each with its own cache (capacities 40, 48, 33) and
    position (the parametrized one, 17 and 0), two layers: each written and read in its own."""
    torch.manual_seed(position)
    heads, kv_heads, layers = 6, 2, 2
    capacities, positions = [40, 48, 33], [position, 17, 0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    caches = []
    for capacity in capacities:
        stores = [[_stored(torch.randn(kv_heads, capacity, dim, device=device), kv) for _ in range(layers)]
                  for _ in range(2)]
        caches.append(SimpleNamespace(keys=[r for r, _ in stores[0]], values=[r for r, _ in stores[1]],
                                      key_scales=[s for _, s in stores[0] if s is not None],
                                      value_scales=[s for _, s in stores[1] if s is not None]))
    before = [{name: [t.clone() for t in getattr(c, name)] for name in ("keys", "values", "key_scales", "value_scales")}
              for c in caches]
    qkv = torch.randn(len(capacities), 1, (heads + 2 * kv_heads) * dim, device=device)
    cos, sin = torch.randn(2, 64, dim, device=device)

    addresses = triton_decode.CacheAddresses(caches)
    pos = torch.tensor(positions, device=device)
    q = triton_decode.rotary_store(qkv, cos, sin, pos, addresses, 1, heads)
    attn = triton_decode.decode_attention(q, addresses, 1, pos, window)

    for s, p in enumerate(positions):
        q_ref, k_ref, v_ref = (t.reshape(1, 1, -1, dim).transpose(1, 2)
                               for t in qkv[s].split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
        q_ref = apply_rotary(q_ref, cos[p][None, None], sin[p][None, None])
        want = before[s]
        for name, scales, new in (("keys", "key_scales", apply_rotary(k_ref, cos[p][None, None], sin[p][None, None])),
                                  ("values", "value_scales", v_ref)):
            rows, row_scales = _stored(new[0, :, 0], kv)
            want[name][1][:, p] = rows
            if row_scales is not None:
                want[scales][1][:, p] = row_scales
        first = max(0, p - window + 1) if window else 0  # the slots the query sees
        keys = _widened(want["keys"][1], want["key_scales"][1] if kv == torch.int8 else None)
        values = _widened(want["values"][1], want["value_scales"][1] if kv == torch.int8 else None)
        expected = attend(q_ref, keys[None, :, first:p + 1], values[None, :, first:p + 1], p)[0, :, 0]
        torch.testing.assert_close(q[s], q_ref[0, :, 0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(attn[s], expected, rtol=1e-5, atol=1e-5)
        for name in ("keys", "values", "key_scales", "value_scales"):  # layer 0 untouched, layer 1 as stored
            for layer, tensor in enumerate(getattr(caches[s], name)):
                torch.testing.assert_close(tensor, want[name][layer], rtol=1e-6, atol=1e-6)
