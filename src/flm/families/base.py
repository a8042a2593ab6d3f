"""What every family adapter provides.

An adapter turns a family's config keys into a ModelConfig and its tensors into the layout of
`flm.layout` (Hugging Face LLaMA names: renaming, splitting packed tensors), checking every
shape against the config before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ..config import (
    ModelConfig,
    as_int_list,
    as_str_list,
    parse_scalar,
    require,
    rope_from_dict,
)
from ..errors import CheckpointError, FlmFormatError
from ..format.flm import FlmFile, rows_of
from ..format.hf import TensorSource
from ..layout import canonical_shapes, layer_shapes, tensor_kind


@dataclass
class OutputTensor:
    """One tensor of the .flm: its name, shape, role (decides its dtype) and how to read it."""

    name: str
    shape: tuple[int, ...]
    kind: str
    read: Callable[[], torch.Tensor]


# tensors fastllm's C++ side concatenates row-wise (basellm::MergeWeightsFromRules, Baichuan's
# W_pack) and can save that way -> the canonical tensors, in row order
FASTLLM_CONCATENATED = {
    "self_attn.mergeqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.W_pack": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gateup_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def split_packed(flm: FlmFile, packed: str, pieces: dict[str, torch.Tensor]) -> None:
    """Replace the file's tensor `packed` by the named pieces, each the rows its index tensor
    lists (kept in the stored dtype), after checking the rows add up."""
    rec = flm.tensors[packed]
    expected = sum(len(rows) for rows in pieces.values())
    if not rec.dims or rec.dims[0] != expected:
        raise FlmFormatError(flm.path, f"tensor {packed} has shape {list(rec.dims)}; the config implies "
                                       f"{expected} rows ({', '.join(n.rsplit('.', 2)[-2] for n in pieces)})")
    for name, rows in pieces.items():
        flm.tensors[name] = rows_of(flm, rec, rows, name)
    del flm.tensors[packed]


class Family:
    """A LLaMA-shaped family; subclasses override the config keys or the tensor mapping."""

    name = "llama"
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    default_template: str | None = None

    # ------------------------------------------------------------ config
    def config(self, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        generation = generation or {}
        theta, scaling = rope_from_dict(raw)
        heads = int(require(raw, "num_attention_heads"))
        eos = as_int_list(raw.get("eos_token_id")) + as_int_list(generation.get("eos_token_id"))
        flags = self.bias_flags(raw)
        return ModelConfig(
            model_type=str(self.name),
            hidden_size=int(require(raw, "hidden_size")),
            intermediate_size=int(require(raw, "intermediate_size")),
            num_hidden_layers=int(require(raw, "num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(parse_scalar(raw.get("num_key_value_heads")) or heads),
            vocab_size=int(require(raw, "vocab_size")),
            head_dim=int(parse_scalar(raw.get("head_dim")) or 0),
            rms_norm_eps=float(parse_scalar(raw.get("rms_norm_eps", raw.get("layer_norm_epsilon", 1e-6)))),
            max_position_embeddings=int(parse_scalar(raw.get("max_position_embeddings")) or 2048),
            rope_theta=theta if theta is not None else 10000.0,
            rope_scaling=scaling,
            tie_word_embeddings=bool(parse_scalar(raw.get("tie_word_embeddings", False))),
            hidden_act=str(parse_scalar(raw.get("hidden_act")) or "silu"),
            bos_token_id=_first(as_int_list(raw.get("bos_token_id")) or as_int_list(generation.get("bos_token_id"))),
            eos_token_ids=list(dict.fromkeys(eos)),
            pad_token_id=_first(as_int_list(raw.get("pad_token_id"))),
            architectures=as_str_list(raw.get("architectures")),
            sliding_window=self.sliding_window(raw),
            **flags,
        )

    def sliding_window(self, raw: dict[str, Any]) -> int | None:
        """Mistral configs enable it by setting sliding_window; Qwen2-style ones by use_sliding_window."""
        window = parse_scalar(raw.get("sliding_window"))
        enabled = parse_scalar(raw.get("use_sliding_window", str(raw.get("model_type")) == "mistral"))
        return int(window) if window and enabled else None

    def bias_flags(self, raw: dict[str, Any]) -> dict[str, bool]:
        attention_bias = bool(parse_scalar(raw.get("attention_bias", False)))
        return {"qkv_bias": attention_bias, "o_bias": attention_bias,
                "mlp_bias": bool(parse_scalar(raw.get("mlp_bias", False)))}

    def template_for(self, raw: dict[str, Any]) -> str | None:
        """The preset this family's chat models use (None: decide from the name or chat_template)."""
        return self.default_template

    # ------------------------------------------------------------ tensors
    def source_name(self, canonical: str) -> str:
        """The checkpoint's name for a canonical tensor (identity for LLaMA layouts)."""
        return canonical

    def plan(self, source: TensorSource, cfg: ModelConfig) -> list[OutputTensor]:
        """Every tensor of the .flm, shape-checked against the config before any is read."""
        available = set(source.names())
        out = []
        for name, shape in canonical_shapes(cfg).items():
            reader = self.reader(source, available, cfg, name)
            if reader is None:
                raise CheckpointError(f"checkpoint has no tensor for {name} (looked for {self.source_name(name)!r})")
            actual_shape, read = reader
            if tuple(actual_shape) != tuple(shape):
                raise CheckpointError(
                    f"tensor {self.source_name(name)!r} has shape {tuple(actual_shape)} but the config implies {shape}"
                )
            out.append(OutputTensor(name, shape, tensor_kind(name), read))
        return out

    def adopt_file_names(self, flm: FlmFile, cfg: ModelConfig) -> None:
        """Give the tensors of a fastllm-written file their canonical names: fastllm's writer keeps
        the checkpoint's own (InternLM2's `model.tok_embeddings.weight`, ...), and fastllm's C++
        side may have concatenated q/k/v or gate/up (FASTLLM_CONCATENATED) before saving."""
        shapes = layer_shapes(cfg)
        row_ranges = {}  # packed -> (part, its rows in the pack), the same in every layer
        for packed, parts in FASTLLM_CONCATENATED.items():
            start, row_ranges[packed] = 0, []
            for part in parts:
                rows = shapes[f"{part}.weight"][0]
                row_ranges[packed].append((part, torch.arange(start, start + rows)))
                start += rows
        for index in range(cfg.num_hidden_layers):
            for packed, ranges in row_ranges.items():
                for kind in ("weight", "bias"):
                    pieces = {f"model.layers.{index}.{part}.{kind}": rows for part, rows in ranges}
                    name = f"model.layers.{index}.{packed}.{kind}"
                    if name in flm.tensors and not any(piece in flm.tensors for piece in pieces):
                        split_packed(flm, name, pieces)
        for name in canonical_shapes(cfg):
            src = self.source_name(name)
            if name not in flm.tensors and src != name and src in flm.tensors:
                flm.tensors[name] = replace(flm.tensors.pop(src), name=name)

    def reader(self, source: TensorSource, available: set[str], cfg: ModelConfig, name: str):
        """(shape, read) for a canonical tensor, or None when the checkpoint lacks it."""
        src = self.source_name(name)
        if src in available:
            return source.shape(src), (lambda: source.read(src))
        if name == "lm_head.weight":  # tied (or lm_head omitted): fastllm's files still carry it
            emb = self.source_name("model.embed_tokens.weight")
            if emb in available:
                return source.shape(emb), (lambda: source.read(emb))
        return None


def _first(values: list[int]) -> int | None:
    return values[0] if values else None
