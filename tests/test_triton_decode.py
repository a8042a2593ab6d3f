"""The GPU decode step's fused kernels (RoPE + cache write, attention) against the torch
formulas, on a GPU or through Triton's interpreter on the CPU; the whole step is held to the
reference in test_backends."""

import pytest
import torch

from flm.kernels import triton_decode, triton_linear
from flm.model import attend
from flm.rope import apply_rotary

needs_triton = pytest.mark.skipif(not triton_linear.available(), reason="Triton is not installed (pip install triton)")


@needs_triton
@pytest.mark.parametrize("dim", [16, 24])  # 24: neither half nor whole a power of two (masked lanes)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("position", [0, 3, 31, 32, 39])  # 31/32: the ends of the first block of slots
def test_fused_attention_kernels_equal_torch_formulas(dim, window, position):
    """One launch for three sequences, each with its own cache (capacities 40, 48, 33) and
    position (the parametrized one, 17 and 0), two layers: each written and read in its own."""
    torch.manual_seed(position)
    heads, kv_heads, layers = 6, 2, 2
    capacities, positions = [40, 48, 33], [position, 17, 0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keys = [[torch.randn(kv_heads, c, dim, device=device) for _ in range(layers)] for c in capacities]
    values = [[torch.randn(kv_heads, c, dim, device=device) for _ in range(layers)] for c in capacities]
    want_keys, want_values = ([[t.clone() for t in seq] for seq in store] for store in (keys, values))
    qkv = torch.randn(len(capacities), 1, (heads + 2 * kv_heads) * dim, device=device)
    cos, sin = torch.randn(2, 64, dim, device=device)

    caches = triton_decode.CacheAddresses(keys, values)
    pos = torch.tensor(positions, device=device)
    q = triton_decode.rotary_store(qkv, cos, sin, pos, caches, 1, heads)
    attn = triton_decode.decode_attention(q, caches, 1, pos, window)

    for s, p in enumerate(positions):
        q_ref, k_ref, v_ref = (t.reshape(1, 1, -1, dim).transpose(1, 2)
                               for t in qkv[s].split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
        q_ref = apply_rotary(q_ref, cos[p][None, None], sin[p][None, None])
        want_keys[s][1][:, p] = apply_rotary(k_ref, cos[p][None, None], sin[p][None, None])[0, :, 0]
        want_values[s][1][:, p] = v_ref[0, :, 0]
        first = max(0, p - window + 1) if window else 0  # the slots the query sees
        want = attend(q_ref, want_keys[s][1][None, :, first:p + 1], want_values[s][1][None, :, first:p + 1], p)[0, :, 0]
        torch.testing.assert_close(q[s], q_ref[0, :, 0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(attn[s], want, rtol=1e-5, atol=1e-5)
        for layer in range(layers):  # layer 0 untouched
            torch.testing.assert_close(keys[s][layer], want_keys[s][layer], rtol=1e-6, atol=1e-6)
            assert torch.equal(values[s][layer], want_values[s][layer])
