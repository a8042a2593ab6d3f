"""Checks shared by the test modules."""

import pytest
import torch

from flm.kernels import ReferenceLinear
from flm.quant import DType, Quantized, quantize

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

# The quantized weight types the kernel tests cover: name -> (dtype, group size).
QUANTIZED = {"int8": (DType.INT8, 128), "int4": (DType.INT4_NOZERO, 128), "int4g32": (DType.INT4_GROUP, 32),
             "int4g128": (DType.INT4_GROUP, 128)}


def kernel_weights(name: str, w: torch.Tensor) -> tuple[torch.Tensor | Quantized, torch.Tensor]:
    """(w stored as `name` — float32, bfloat16, float16 or a QUANTIZED type —, the float32
    weights it stands for)."""
    if name == "float32":
        return w, w
    if name in ("bfloat16", "float16"):
        stored = w.to(getattr(torch, name))
        return stored, stored.float()
    q = quantize(w, *QUANTIZED[name])
    return q, ReferenceLinear(q, tuple(w.shape), None).dense()


def logits_close(got: torch.Tensor, want: torch.Tensor, relative: float) -> bool:
    """max |got - want| within `relative` of want's range: logits are judged against their own
    spread, which is what decides the next token (on any device, any float dtype)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).abs().max()) <= relative * float(want.max() - want.min())


def fused_rounds_input_once(fused, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch, times: int = 1) -> torch.Tensor:
    """fused(x), asserting that FusedLinear rounded x to int4's 16-bit grid with torch ops
    `times` times for all its parts (once; none where the parts' kernels round it) and that the
    result equals each part run alone, bit for bit; returns the result."""
    import flm.kernels as kernels
    from flm.quant import round_input_int16

    alone = torch.cat([p(x) for p in fused.parts], dim=-1)
    calls = []
    monkeypatch.setattr(kernels, "round_input_int16", lambda t: calls.append(t) or round_input_int16(t))
    got = fused(x)
    assert len(calls) == times
    torch.testing.assert_close(got, alone, rtol=0, atol=0)
    return got
