"""A Transformer from a parsed .flm file: every tensor checked against the config's layout,
the weights used where they lie (memory-mapped, in their file dtype) on the CPU, or copied to
the GPU in their file dtype, each linear on the fastest kernels its dtype and device allow."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import FlmFormatError
from .format.flm import FlmFile
from .kernels import FusedLinear, Linear, make_linear
from .layout import canonical_shapes
from .model import EmbeddingTable, Layer, Transformer
from .quant import FLOAT_DTYPES, DType, Quantized

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def check_layout(flm: FlmFile, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The expected shapes, after checking that the file holds each tensor in its shape (a tied
    output layer may be missing: the embedding serves)."""
    expected = canonical_shapes(cfg)
    for name, shape in expected.items():
        rec = flm.tensors.get(name)
        if rec is None and name == "lm_head.weight":
            continue
        if rec is None:
            raise FlmFormatError(flm.path, f"missing tensor {name} required by the model config")
        if tuple(rec.dims) != tuple(shape):
            raise FlmFormatError(flm.path, f"tensor {name} has shape {list(rec.dims)} but the config implies {list(shape)}")
    return expected


def load_transformer(flm: FlmFile, cfg: ModelConfig, reference: bool = False, device: str = "cpu") -> Transformer:
    """The model of a parsed file on `device`; `reference`: every linear on the plain torch path."""
    expected = check_layout(flm, cfg)
    if device == "cpu":
        flm.prefault()  # the weights are used where they lie: map them now, not during the first prompt

    def weight(name: str) -> torch.Tensor | Quantized:
        """Linear weights as stored bytes (no copy even when a name left them unaligned)."""
        rec = flm.tensors[name]
        if device != "cpu":
            if rec.dtype in FLOAT_DTYPES:
                return flm.float_tensor(rec).to(device)
            q = flm.quantized(rec)
            return Quantized(q.dtype, q.mins.to(device), q.maxs.to(device), q.data.to(device), q.group, q.group_cnt)
        return flm.float_tensor(rec) if rec.dtype == DType.FLOAT32 else flm.quantized(rec)

    def plain(name: str) -> torch.Tensor:
        rec = flm.tensors[name]
        if rec.dtype not in FLOAT_DTYPES:
            raise FlmFormatError(flm.path, f"tensor {name} must be a float type, is {rec.dtype.name}")
        return flm.float_tensor(rec).to(device=device, dtype=torch.float32)

    def linear(prefix: str) -> Linear:
        bias = plain(prefix + ".bias") if prefix + ".bias" in flm.tensors else None
        return make_linear(weight(prefix + ".weight"), expected[prefix + ".weight"], bias, reference)

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v, o, gate, up, down = (linear(p + name) for name in LINEARS)
        layers.append(Layer(plain(p + "input_layernorm.weight"), plain(p + "post_attention_layernorm.weight"),
                            FusedLinear([q, k, v]), o, FusedLinear([gate, up]), down))
    embed_rec = flm.tensors["model.embed_tokens.weight"]
    if embed_rec.dtype in FLOAT_DTYPES:
        embed = EmbeddingTable(flm.raw(embed_rec).reshape(embed_rec.dims[0], -1).to(device),
                               FLOAT_DTYPES[embed_rec.dtype])
    else:
        embed = EmbeddingTable(make_linear(flm.quantized(embed_rec), tuple(embed_rec.dims), reference=True)
                               .dense().to(device), torch.float32)
    head_name = "lm_head.weight" if "lm_head.weight" in flm.tensors else "model.embed_tokens.weight"
    lm_head = make_linear(weight(head_name), (cfg.vocab_size, cfg.hidden_size), None, reference)
    return Transformer(cfg, embed, layers, plain("model.norm.weight"), lm_head)
