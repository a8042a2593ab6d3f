"""GGUF files (llama.cpp's format) as a conversion source: `flm convert model.gguf out.flm`.

The gguf package memory-maps the file; each tensor is dequantized to float32 on its own, with
the package's reference dequantizers (the ones transformers' GGUF loader uses), renamed to
Hugging Face's names and handed to the converter like a checkpoint's, so a model never sits
in memory whole. llama.cpp's converter interleaves the rows of q and k for its RoPE; they are
put back in Hugging Face's order. The tokenizer is rebuilt from the vocabulary GGUF carries:
byte-level BPE ("gpt2") with the split llama.cpp names in `tokenizer.ggml.pre`, or
SentencePiece-style BPE ("llama") from pieces and scores. Only the `llama` architecture (which
llama.cpp also uses for Mistral, Yi, DeepSeek and the like) is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
# llama.cpp's `tokenizer.ggml.pre` names -> byte_level_splits family names
PRE_SPLITS = {"llama-bpe": "llama3", "llama3": "llama3", "qwen2": "qwen2", "deepseek-v3": "deepseek-v3",
              "deepseek-coder": "deepseek-coder", "deepseek-llm": "deepseek-llm"}


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one the model does not use."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row interleaving: per head, rows (0, 2, 4, ..., 1, 3, ...) came from
    Hugging Face's (first half, second half) of the rotary dimension."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GGUFFile:
    """A GGUF model: metadata, tensors by Hugging Face name (TensorSource), and its tokenizer."""

    def __init__(self, path: str | Path):
        try:
            from gguf import GGUFReader
        except ImportError:
            raise CheckpointError("reading GGUF files needs the gguf package: pip install gguf") from None
        self.path = Path(path)
        try:
            self._reader = GGUFReader(str(self.path))
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self.arch = self.value("general.architecture")
        if self.arch != "llama":
            raise CheckpointError(f"{self.path}: GGUF architecture {self.arch!r} is not supported; flm reads "
                                  "'llama' GGUF files (convert others from their Hugging Face folder)")
        self._tensors: dict[str, Any] = {}
        for tensor in self._reader.tensors:
            name = hf_name(tensor.name)
            if tensor.name == "rope_freqs.weight":
                raise CheckpointError(f"{self.path}: per-frequency RoPE factors (Llama-3.1 style rope_freqs) are "
                                      "not supported from GGUF; convert the Hugging Face folder instead")
            if name is not None:
                self._tensors[name] = tensor
        self.config = self._config()

    # ------------------------------------------------------------ metadata
    def value(self, key: str, default: Any = None) -> Any:
        fld = self._reader.fields.get(key)
        if fld is None:
            return default
        kind = fld.types[0].name
        if kind == "ARRAY":
            if fld.types[-1].name == "STRING":
                return [bytes(fld.parts[i]).decode("utf-8", errors="replace") for i in fld.data]
            return [fld.parts[i].tolist()[0] for i in fld.data]
        if kind == "STRING":
            return bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")
        return fld.parts[fld.data[0]].tolist()[0]

    def _config(self) -> dict[str, Any]:
        a = self.arch
        heads = self.value(f"{a}.attention.head_count")
        hidden = self.value(f"{a}.embedding_length")
        if heads is None or hidden is None or self.value(f"{a}.block_count") is None:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks {a}.attention.head_count / embedding_length "
                                  "/ block_count")
        tokens = self.value("tokenizer.ggml.tokens") or []
        config: dict[str, Any] = {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden, "num_hidden_layers": self.value(f"{a}.block_count"),
            "intermediate_size": self.value(f"{a}.feed_forward_length"),
            "num_attention_heads": heads, "num_key_value_heads": self.value(f"{a}.attention.head_count_kv", heads),
            "rms_norm_eps": self.value(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            "max_position_embeddings": self.value(f"{a}.context_length", 2048),
            "rope_theta": self.value(f"{a}.rope.freq_base", 10000.0),
            "vocab_size": self.value(f"{a}.vocab_size", len(tokens)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self.value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.value("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.value("tokenizer.ggml.padding_token_id"),
        }
        key_length = self.value(f"{a}.attention.key_length")
        if key_length and key_length != hidden // heads:
            config["head_dim"] = key_length
        scaling = self.value(f"{a}.rope.scaling.type")
        if scaling and scaling != "none":
            config["rope_scaling"] = {"rope_type": scaling, "factor": self.value(f"{a}.rope.scaling.factor", 1.0)}
            original = self.value(f"{a}.rope.scaling.original_context_length")
            if original:
                config["rope_scaling"]["original_max_position_embeddings"] = original
        return config

    # ------------------------------------------------------------ TensorSource
    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def read(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: tensor {tensor.name} ({tensor.tensor_type.name}) cannot be "
                                  f"dequantized: {exc}") from None
        weight = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(self.shape(name))  # off the map
        if name.endswith("q_proj.weight"):
            weight = unpermute_rows(weight, self.config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rows(weight, self.config["num_key_value_heads"])
        return weight
