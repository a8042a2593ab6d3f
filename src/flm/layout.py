"""The LLaMA tensor layout that .flm files and the runtime share: every tensor's canonical name
(the Hugging Face LLaMA names fastllm's own LLaMA model reads) and its shape, from a ModelConfig
alone. Family adapters map their checkpoints onto it; the loader checks files against it."""

from __future__ import annotations

from .config import ModelConfig

# a tensor's role, which decides the dtype it is stored in
LINEAR, EMBEDDING, PLAIN = "linear", "embedding", "plain"


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical per-layer tensor shapes (suffix after `model.layers.N.`)."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    shapes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (cfg.intermediate_size, h),
        "mlp.up_proj.weight": (cfg.intermediate_size, h),
        "mlp.down_proj.weight": (h, cfg.intermediate_size),
    }
    if cfg.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if cfg.o_bias:
        shapes["self_attn.o_proj.bias"] = (h,)
    if cfg.mlp_bias:
        shapes.update({"mlp.gate_proj.bias": (cfg.intermediate_size,), "mlp.up_proj.bias": (cfg.intermediate_size,),
                       "mlp.down_proj.bias": (h,)})
    return shapes


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape the runtime expects, in file order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        for suffix, shape in layer_shapes(cfg).items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    shapes["model.norm.weight"] = (cfg.hidden_size,)
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def tensor_kind(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return EMBEDDING
    if name.endswith("_proj.weight") or name == "lm_head.weight":
        return LINEAR
    return PLAIN
