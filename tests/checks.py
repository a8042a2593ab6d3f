"""Checks shared by the test modules."""

import pytest
import torch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def logits_close(got: torch.Tensor, want: torch.Tensor, relative: float) -> bool:
    """max |got - want| within `relative` of want's range: logits are judged against their own
    spread, which is what decides the next token (on any device, any float dtype)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).abs().max()) <= relative * float(want.max() - want.min())
