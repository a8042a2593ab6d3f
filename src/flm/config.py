"""One normalized model config from any source: config.json (transformers 4.x or 5.x spelling,
family-specific keys, the cookbook's flat overrides) or a .flm key/value table.

Nothing downstream reads raw config dicts; family adapters translate their keys into the
`ModelConfig` fields here and the runtime reads only those fields.
"""

from __future__ import annotations

import ast
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError


# What a KV cache may store (kv_cache.py). float32 by default: a float16 cache keeps SmolLM2's
# greedy answers but moves logits past the 1e-4-of-range bound every family test holds flm to
# against transformers (docs/performance.md, "KV cache")
KV_CACHE_DTYPES = ("float32", "float16", "bfloat16", "int8")
DEFAULT_KV_CACHE_DTYPE = "float32"


@dataclass
class RopeScaling:
    """RoPE scaling as transformers defines it; `kind` is default/linear/dynamic/llama3/yarn."""

    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    attention_factor: float | None = None  # yarn / longrope mscale


@dataclass
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    architectures: list[str] = field(default_factory=list)
    sliding_window: int | None = None  # Mistral: attend to the last N positions only

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // max(1, self.num_attention_heads)
        self.validate()

    def validate(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config value {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (LLaMA-family models use silu)")
        if self.rope_scaling.kind not in ("default", "linear", "dynamic", "llama3", "yarn"):
            raise ConfigError(f"rope scaling type {self.rope_scaling.kind!r} is not supported")

    @property
    def context_window(self) -> int:
        """The longest context the model's RoPE serves, the default context window: dynamic NTK
        extends the trained window (max_position_embeddings) by its factor; llama3 and YaRN scale
        their original window by theirs (configs often name the result as max_position_embeddings
        already); linear scaling's checkpoints name the scaled window, as do unscaled ones."""
        s = self.rope_scaling
        if s.kind == "dynamic":
            return int(self.max_position_embeddings * s.factor)
        if s.kind in ("llama3", "yarn") and s.original_max_position_embeddings:
            return max(self.max_position_embeddings, int(s.original_max_position_embeddings * s.factor))
        return self.max_position_embeddings

    # ------------------------------------------------------------ .flm key/value table

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        data["rope_scaling"] = RopeScaling(**data.get("rope_scaling", {}))
        return cls(**data)

    def fastllm_kv(self) -> dict[str, str]:
        """The keys fastllm's LLaMA model reads, spelled as its torch2flm writes them."""
        kv = {
            "model_type": self.model_type,
            "hidden_size": str(self.hidden_size),
            "intermediate_size": str(self.intermediate_size),
            "num_hidden_layers": str(self.num_hidden_layers),
            "num_attention_heads": str(self.num_attention_heads),
            "num_key_value_heads": str(self.num_key_value_heads),
            "head_dim": str(self.head_dim),
            "vocab_size": str(self.vocab_size),
            "rms_norm_eps": str(self.rms_norm_eps),
            "max_position_embeddings": str(self.max_position_embeddings),
            "rope_theta": str(self.rope_theta),
            "tie_word_embeddings": str(self.tie_word_embeddings),
        }
        if self.bos_token_id is not None:
            kv["bos_token_id"] = str(self.bos_token_id)
        if self.eos_token_ids:
            kv["eos_token_id"] = str(self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids)
        if self.rope_scaling.kind != "default":
            kv["rope_scaling.type"] = self.rope_scaling.kind
            kv["rope_scaling.factor"] = str(self.rope_scaling.factor)
        return kv


# ---------------------------------------------------------------- parsing helpers

def parse_scalar(value: Any) -> Any:
    """Values in .flm files are Python str() of the original: '1e-06', 'True', '[2, 3]'."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    if text in ("None", "null", ""):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def as_int_list(value: Any) -> list[int]:
    value = parse_scalar(value)
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def as_str_list(value: Any) -> list[str]:
    """A list of names from a list, one name, or the str() of a list that .flm files hold."""
    value = parse_scalar(value)
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def rope_from_dict(raw: dict[str, Any]) -> tuple[float | None, RopeScaling]:
    """RoPE settings from every spelling: rope_parameters (5.x), rope_scaling (4.x), flat
    `rope_scaling.type`/`rope_scaling.factor` (the cookbook's overrides, fastllm's kv)."""
    spec: dict[str, Any] = {}
    # a .flm written by fastllm's torch2flm under transformers 5 holds str() of the whole dict
    params = parse_scalar(raw.get("rope_parameters"))
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if raw.get("rope_theta") is not None:  # 4.x spelling, or the cookbook's explicit override
        theta = raw["rope_theta"]
    flat = {key.split(".", 1)[1]: parse_scalar(value) for key, value in raw.items()
            if isinstance(key, str) and key.startswith("rope_scaling.") and value is not None}
    for layer in (params, parse_scalar(raw.get("rope_scaling")), flat):  # later spellings override earlier ones
        if isinstance(layer, dict):
            spec.update(layer)
            if "type" in layer and "rope_type" not in layer:
                spec["rope_type"] = layer["type"]
    kind = spec.get("rope_type") or spec.get("type") or "default"
    if kind == "su":
        kind = "longrope"
    scaling_obj = RopeScaling(
        kind=str(kind),
        factor=float(spec.get("factor") or 1.0),
        original_max_position_embeddings=spec.get("original_max_position_embeddings"),
        low_freq_factor=spec.get("low_freq_factor"),
        high_freq_factor=spec.get("high_freq_factor"),
        beta_fast=spec.get("beta_fast"),
        beta_slow=spec.get("beta_slow"),
        attention_factor=spec.get("attention_factor"),
    )
    if scaling_obj.kind == "linear" and scaling_obj.factor == 1.0:
        scaling_obj.kind = "default"
    return (None if theta is None else float(parse_scalar(theta))), scaling_obj


def require(raw: dict[str, Any], *names: str, source: str = "config.json") -> Any:
    """The first of `names` present in `raw`, else a ConfigError naming what is missing."""
    for name in names:
        if raw.get(name) is not None:
            return parse_scalar(raw[name])
    raise ConfigError(f"{source} has no {' / '.join(names)}; is this a LLaMA-family model config?")
