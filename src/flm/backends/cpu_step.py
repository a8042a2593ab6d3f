"""The CPU's decode step: every layer of a one-token-per-sequence step in one C++ call
(kernels/csrc/decode_step.cpp), from the token ids to the logits, on plain float buffers with
the GIL released. Driving the same work from Python costs about twenty ATen ops per layer, as
long as reading a small model's weights (bench/HISTORY.md, "Decode step in C++"). Prompts run
the reference forward, whose linears are the same SIMD kernels and take ~90% of its time.

Available when every linear layer, the output layer included, is on the SIMD kernels;
otherwise the model runs on the torch backend.
"""

from __future__ import annotations

import torch

from ..kernels import FusedLinear, Linear, NativeLinear
from ..kernels.native import kernel_args, native, weight_kind
from ..kv_cache import KVCache
from ..model import Transformer
from .base import Backend, BackendUnavailable


class CpuStepBackend(Backend):
    name = "cpu-step"

    def __init__(self, model: Transformer, window: int | None = None, kv_dtype: torch.dtype = torch.float32):
        super().__init__(model, window, kv_dtype)
        self.decoder = _build_decoder(model)
        self.sliding = model.cfg.sliding_window or 0  # 0: every position

    def _step(self, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
        positions = [cache.length for cache in caches]
        rows, tables = positions, self.model.rotary.tables(max(positions) + 1, self.model.device)
        if tables is None:  # dynamic NTK past the trained length: each sequence's own angles
            angles = [self.model.rotary.cos_sin(torch.tensor([[p]])) for p in positions]
            rows, tables = list(range(len(positions))), tuple(torch.cat([a[i][0] for a in angles]) for i in (0, 1))
        # per sequence, per layer (sequence-major), as the step takes them
        stores = [[t for cache in caches for t in getattr(cache, name)]
                  for name in ("keys", "values", "key_scales", "value_scales")]
        return self.decoder.token_logits(tokens, *stores, positions, rows, *tables, self.sliding)


def _kernel_weights(module, linear: Linear):
    """The kernel-side weights of a (fused) linear layer."""
    if isinstance(linear, FusedLinear) and linear.native is not None:
        params = linear.native
    elif isinstance(linear, NativeLinear):
        params = [linear.params]
    else:
        raise BackendUnavailable(f"a {type(linear).__name__} layer is not on the SIMD kernels")
    bias = linear.bias if linear.bias is not None else torch.empty(0)
    return module.linear_weights(*kernel_args(params), params[0].k, bias.contiguous())


def _build_decoder(model: Transformer):
    module = native()
    cfg = model.cfg
    if module is None:
        raise BackendUnavailable("the SIMD kernels are not built (FLM_KERNELS=reference, no AVX2, or no compiler)")
    if cfg.hidden_act != "silu":
        raise BackendUnavailable(f"the step computes SiLU, the model uses {cfg.hidden_act}")
    embed = model.embed
    if model.device.type != "cpu" or not embed.rows.is_contiguous():
        raise BackendUnavailable("the model is not in CPU memory")
    decoder = module.Decoder(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.rms_norm_eps)
    for layer in model.layers:
        linears = [_kernel_weights(module, lin) for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        norms = [n.to(torch.float32).contiguous() for n in (layer.input_norm, layer.post_norm)]
        decoder.add_layer(*norms, *linears)
    decoder.set_head(model.norm.to(torch.float32).contiguous(), _kernel_weights(module, model.lm_head))
    decoder.set_embedding(embed.rows, weight_kind(embed.dtype))
    return decoder
