"""Qwen2: LLaMA tensor names, biases on q/k/v (always, not a config flag), no bias on o."""

from __future__ import annotations

from typing import Any

from .base import Family


class Qwen2Family(Family):
    name = "qwen2"
    model_types = ("qwen2",)
    architectures = ("Qwen2ForCausalLM",)
    default_template = "qwen2"

    def bias_flags(self, raw: dict[str, Any]) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
