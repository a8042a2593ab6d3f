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


class EmbeddingRows(Protocol):
    rows: torch.Tensor  # [vocab, hidden * element size] bytes as stored, or [vocab, hidden] float32
    dtype: torch.dtype


class DecodeStep:
    """x [B, hidden] -> x after every layer, one new token per sequence at its own position; with
    `has_head`, `logits` also applies the final norm and output layer in the same call."""

    def __init__(self, decoder, cfg: ModelConfig, has_head: bool, takes_tokens: bool):
        self.decoder = decoder
        self.window = cfg.sliding_window or 0
        self.has_head = has_head
        self.takes_tokens = takes_tokens

    def __call__(self, x: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], positions: list[int],
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """keys/values: per sequence, per layer, [kv_heads, capacity, head_dim] views of its cache."""
        return self.decoder.step(x, keys, values, positions, cos, sin, self.window)

    def logits(self, x: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], positions: list[int],
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The step, then logits [B, vocab] (only where `has_head`)."""
        return self.decoder.step_logits(x, keys, values, positions, cos, sin, self.window)

    def token_logits(self, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
                     positions: list[int], cos_table: torch.Tensor, sin_table: torch.Tensor) -> torch.Tensor:
        """From token ids (embedding and rotary rows looked up in C++) to logits [B, vocab]
        (only where `takes_tokens`)."""
        return self.decoder.token_logits(tokens, keys, values, positions, cos_table, sin_table, self.window)


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


EMBEDDING_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 4}  # the kernels' codes


def build_decode_step(cfg: ModelConfig, layers: Sequence[DecoderLayerWeights], norm: torch.Tensor,
                      lm_head: Linear, embedding: EmbeddingRows | None = None) -> DecodeStep | None:
    """The C++ step over these layers (and the final norm and output layer where those are on the
    kernels too; with them, the embedding lookup), or None when the kernels or some layer's
    weights do not allow it."""
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
    head = _linear_weights(module, lm_head)
    if head is not None:
        decoder.set_head(norm.to(torch.float32).contiguous(), head)
    takes_tokens = (head is not None and embedding is not None and embedding.dtype in EMBEDDING_KINDS
                    and embedding.rows.device.type == "cpu" and embedding.rows.is_contiguous())
    if takes_tokens:
        decoder.set_embedding(embedding.rows, EMBEDDING_KINDS[embedding.dtype])
    return DecodeStep(decoder, cfg, has_head=head is not None, takes_tokens=takes_tokens)
