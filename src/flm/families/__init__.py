"""Family registry: model_type / architectures -> adapter. Adding a family = one module + one line."""

from __future__ import annotations

from typing import Any

from ..config import as_str_list
from ..errors import UnknownFamilyError
from .base import Family, OutputTensor
from .internlm import InternLMFamily
from .internlm2 import InternLM2Family
from .llama import LlamaFamily
from .qwen2 import Qwen2Family

FAMILIES: list[Family] = [LlamaFamily(), InternLMFamily(), InternLM2Family(), Qwen2Family()]


def find_family(raw_config: dict[str, Any]) -> Family:
    """The adapter for a config: by model_type first, then by architectures."""
    model_type = str(raw_config.get("model_type") or "").lower()
    for family in FAMILIES:
        if model_type and model_type in family.model_types:
            return family
    for arch in as_str_list(raw_config.get("architectures")):
        for family in FAMILIES:
            if arch in family.architectures:
                return family
    known = sorted({t for f in FAMILIES for t in f.model_types})
    raise UnknownFamilyError(
        f"unknown model_type {model_type or '(none)'!r} with architectures {raw_config.get('architectures')}; "
        f"flm knows {', '.join(known)}. If the model is LLaMA-shaped, pass --model-type llama "
        f"(or set \"model_type\": \"llama\" in config.json, as the cookbook does)"
    )


__all__ = ["FAMILIES", "Family", "OutputTensor", "find_family"]
