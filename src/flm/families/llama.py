"""LLaMA-shaped checkpoints: LLaMA 1/2, CodeLlama, Vicuna, Alpaca, Chinese-Alpaca-2, BiLLa,
WizardCoder, Deepseek-Coder, Yi, SUS, YuLan, XVERSE and Mistral all store `LlamaForCausalLM`
tensor names and differ only in config values and prompt templates."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..format.hf import TensorSource
from .base import Family

# Early Yi checkpoints (model_type "Yi", YiForCausalLM) named the two layer norms ln1 / ln2.
ALIASES = {"input_layernorm.weight": "ln1.weight", "post_attention_layernorm.weight": "ln2.weight"}
TEMPLATES = {"xverse": "xverse"}


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "xverse", "yi", "deepseek", "baichuan_llama")
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "XverseForCausalLM", "YiForCausalLM")

    def template_for(self, raw: dict[str, Any]) -> str | None:
        return TEMPLATES.get(str(raw.get("model_type", "")).lower())

    def reader(self, source: TensorSource, available: set[str], cfg: ModelConfig, name: str):
        found = super().reader(source, available, cfg, name)
        if found is None and name.startswith("model.layers."):
            prefix, _, rest = name.partition(".layers.")
            index, _, suffix = rest.partition(".")
            alias = f"model.layers.{index}.{ALIASES.get(suffix, suffix)}"
            if alias in available:
                return source.shape(alias), (lambda: source.read(alias))
        return found
