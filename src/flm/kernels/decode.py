"""The one-call decode step (csrc/decode_step.cpp): every layer of a one-token-per-sequence step
in C++, so that small models are not bound by Python and ATen per-op overhead. Built at load
time when every linear layer runs on the SIMD kernels; otherwise the model keeps its
layer-by-layer torch path (the reference for the tests)."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..config import ModelConfig
from . import FusedLinear, Linear, NativeLinear
from .native import kernel_args, native


class DecoderLayerWeights(Protocol):
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear


class DecodeStep:
    """x [B, hidden] -> x after every layer, one new token per sequence at its own position."""

    def __init__(self, decoder, cfg: ModelConfig):
        self.decoder = decoder
        self.window = cfg.sliding_window or 0

    def __call__(self, x: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], positions: list[int],
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """keys/values: per sequence, per layer, [kv_heads, capacity, head_dim] views of its cache."""
        return self.decoder.step(x, keys, values, positions, cos, sin, self.window)


def _linear_weights(module, linear: Linear):
    """The kernel-side weights of a (fused) linear layer, or None when it is not on the kernels."""
    if isinstance(linear, FusedLinear) and linear.native is not None:
        params = linear.native
    elif isinstance(linear, NativeLinear):
        params = [linear.params]
    else:
        return None
    bias = linear.bias if linear.bias is not None else torch.empty(0)
    return module.linear_weights(*kernel_args(params), params[0].k, bias.contiguous())


def build_decode_step(cfg: ModelConfig, layers: Sequence[DecoderLayerWeights]) -> DecodeStep | None:
    """The C++ step over these layers, or None when the kernels or some layer's weights do not allow it."""
    module = native()
    if module is None or cfg.hidden_act != "silu":
        return None
    decoder = module.Decoder(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.rms_norm_eps)
    for layer in layers:
        linears = [_linear_weights(module, lin) for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if any(lin is None for lin in linears):
            return None
        norms = [n.to(torch.float32).contiguous() for n in (layer.input_norm, layer.post_norm)]
        decoder.add_layer(*norms, *linears)
    return DecodeStep(decoder, cfg)
