"""InternLM2: its own tensor names and q/k/v packed into one `wqkv` per layer.

wqkv rows are grouped per KV head: for each of the `num_key_value_heads` groups, the
`num_attention_heads / num_key_value_heads` query heads, then one key head, then one value head,
each `head_dim` rows. Splitting undoes that interleave; every other tensor is a rename. The same
holds when loading a .flm that fastllm's own converter wrote (it keeps these names and the pack).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig, parse_scalar
from ..format.flm import FlmFile
from ..format.hf import TensorSource
from .base import Family, split_packed

RENAMES = {
    "model.embed_tokens.weight": "model.tok_embeddings.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_RENAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.o_proj.bias": "attention.wo.bias",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def split_wqkv(packed: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) from a packed wqkv weight [rows, hidden] or bias [rows]."""
    groups = cfg.num_key_value_heads
    per_group = cfg.num_attention_heads // groups
    view = packed.reshape(groups, per_group + 2, cfg.head_dim, *packed.shape[1:])
    q = view[:, :per_group].reshape(-1, *packed.shape[1:])
    k = view[:, per_group].reshape(-1, *packed.shape[1:])
    v = view[:, per_group + 1].reshape(-1, *packed.shape[1:])
    return q, k, v


def _wqkv_rows(cfg: ModelConfig) -> int:
    """Rows of a packed wqkv: every query head plus one key and one value head per KV group."""
    return (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim


class InternLM2Family(Family):
    name = "internlm2"
    model_types = ("internlm2",)
    architectures = ("InternLM2ForCausalLM",)
    default_template = "internlm2"

    def bias_flags(self, raw: dict[str, Any]) -> dict[str, bool]:
        bias = bool(parse_scalar(raw.get("bias", False)))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False}

    def source_name(self, canonical: str) -> str:
        if canonical in RENAMES:
            return RENAMES[canonical]
        prefix, _, suffix = canonical.partition(".layers.")
        index, _, rest = suffix.partition(".")
        if rest in LAYER_RENAMES:
            return f"model.layers.{index}.{LAYER_RENAMES[rest]}"
        module, _, kind = rest.rpartition(".")
        if module in QKV:
            return f"model.layers.{index}.attention.wqkv.{kind}"
        return canonical

    def adopt_file_names(self, flm: FlmFile, cfg: ModelConfig) -> None:
        """fastllm's llamalike2flm keeps InternLM2's names and its packed wqkv (fastllm splits it per
        step); here each wqkv (and its bias) becomes q, k and v rows once, at load."""
        parts = split_wqkv(torch.arange(_wqkv_rows(cfg)), cfg)
        for index in range(cfg.num_hidden_layers):
            for kind in ("weight", "bias"):
                packed = f"model.layers.{index}.attention.wqkv.{kind}"
                if packed in flm.tensors:
                    split_packed(flm, packed, {f"model.layers.{index}.{module}.{kind}": parts[part]
                                               for module, part in QKV.items()})
        super().adopt_file_names(flm, cfg)

    def reader(self, source: TensorSource, available: set[str], cfg: ModelConfig, name: str):
        src = self.source_name(name)
        if ".attention.wqkv." not in src:
            return super().reader(source, available, cfg, name)
        if src not in available:
            return None
        part = QKV[name.split(".layers.")[1].split(".", 1)[1].rsplit(".", 1)[0]]
        packed_shape = source.shape(src)
        rows = cfg.num_attention_heads * cfg.head_dim if part == 0 else cfg.num_key_value_heads * cfg.head_dim
        shape = (rows, *packed_shape[1:]) if packed_shape[0] == _wqkv_rows(cfg) else packed_shape
        return shape, (lambda: split_wqkv(source.read(src), cfg)[part].contiguous())
