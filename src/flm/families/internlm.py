"""InternLM (v1): LLaMA tensor names with biases on q/k/v/o (`"bias": true`) and RoPE settings
under `rotary` ({"base", "type", "scaling_factor"}). fastllm stops at <eoa> (id 103028)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig, parse_scalar
from .base import Family

EOA_ID = 103028


class InternLMFamily(Family):
    name = "internlm"
    model_types = ("internlm",)
    architectures = ("InternLMForCausalLM",)
    default_template = "internlm"

    def config(self, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        raw = dict(raw)
        rotary = parse_scalar(raw.get("rotary"))
        if isinstance(rotary, dict):
            raw.setdefault("rope_theta", rotary.get("base", 10000.0))
            if rotary.get("type") and not any(k.startswith("rope_scaling") for k in raw if raw[k] is not None):
                raw["rope_scaling"] = {"type": rotary["type"], "factor": rotary.get("scaling_factor", 1.0)}
        cfg = super().config(raw, generation)
        if cfg.vocab_size > EOA_ID and EOA_ID not in cfg.eos_token_ids:
            cfg.eos_token_ids.append(EOA_ID)
        return cfg

    def bias_flags(self, raw: dict[str, Any]) -> dict[str, bool]:
        bias = bool(parse_scalar(raw.get("bias", True)))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False}
