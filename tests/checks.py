"""Checks shared by the test modules."""

import pytest
import torch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


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
