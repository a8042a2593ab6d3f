"""Prompts in bfloat16 (csrc/prefill_bf16.cpp, CPUs with AVX512-BF16): x and the weights rounded
to bf16 exactly as documented, float32 sums; decode batches and FLM_PREFILL=float32 untouched."""

import pytest
import torch

from helpers import QUANTIZED, kernel_weights
from flm.kernels import NativeLinear, make_linear
from flm.kernels.native import cpu_isa, native

needs_bf16 = pytest.mark.skipif(cpu_isa() is None or native() is None or not native().has_prefill_bf16(),
                                reason="CPU without AVX512-BF16: prompts multiply in float32")

KINDS = ["bfloat16", *QUANTIZED]


def _linear(name: str, w: torch.Tensor) -> NativeLinear:
    lin = make_linear(kernel_weights(name, w)[0], tuple(w.shape))
    assert isinstance(lin, NativeLinear)
    return lin


@needs_bf16
@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("tokens,in_features", [(9, 384), (13, 2176), (64, 4224), (300, 384)])
def test_prompt_equals_the_bf16_formula(monkeypatch, name, tokens, in_features):
    """x rounded to bf16; bf16 weights as they are, int8 codes exactly (scale and shift applied
    to the float32 sums), int4 values w = lo + scale * q rounded to bf16. 2176 and 4224 columns
    cross the 2048-column blocks; 300 rows leave partial tiles of weight and x rows."""
    monkeypatch.delenv("FLM_PREFILL", raising=False)
    torch.manual_seed(tokens + in_features)
    lin = _linear(name, torch.randn(300, in_features) * 0.05)
    x = torch.randn(1, tokens, in_features)
    dense = lin.dense()
    if name.startswith("int4"):
        dense = dense.to(torch.bfloat16).float()
    expected = x.to(torch.bfloat16).double() @ dense.double().T
    got = lin(x)
    assert got.shape == (1, tokens, 300)
    assert float((got.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert not torch.equal(got, lin(x.reshape(tokens, in_features)).reshape(1, tokens, 300))  # not the float32 path


@needs_bf16
@pytest.mark.parametrize("name", ["bfloat16", "int8", "int4g32"])
def test_float32_when_asked_and_for_decode_batches(monkeypatch, name):
    """FLM_PREFILL=float32 keeps prompts on the float32 kernels; a batch of decode rows ([B, 1, K]
    or [B, K]) always is, so that a sequence's tokens do not depend on what it is batched with."""
    torch.manual_seed(3)
    lin = _linear(name, torch.randn(200, 512) * 0.05)
    rows = torch.randn(12, 512)
    float32 = lin(rows)
    monkeypatch.delenv("FLM_PREFILL", raising=False)
    assert torch.equal(lin(rows[:, None]).reshape(12, 200), float32)
    monkeypatch.setenv("FLM_PREFILL", "float32")
    assert torch.equal(lin(rows[None]).reshape(12, 200), float32)


@needs_bf16
def test_float16_prompts_stay_float32(monkeypatch):
    """bf16 would drop three bits of every float16 weight: those prompts keep float32."""
    monkeypatch.delenv("FLM_PREFILL", raising=False)
    torch.manual_seed(4)
    w = torch.randn(100, 256).to(torch.float16)
    lin = make_linear(w, (100, 256))
    x = torch.randn(1, 40, 256)
    expected = x.double() @ w.double().T
    assert float((lin(x).double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
