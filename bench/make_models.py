"""Build the benchmark checkpoints: a random-weight 1.1B LLaMA (TinyLlama shape: hidden 2048,
22 layers, 32 heads / 4 KV heads, intermediate 5632, vocab 32000) as fp16 safetensors shards,
with the real Llama-2 tokenizer. Written shard by shard, so building it needs < 1 GB.

    python bench/make_models.py [OUT_DIR]     (default: ~/.cache/flm/bench/llama-1.1b)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float16",
}


def layer_tensors(i: int, cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = {
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    out = {f"model.layers.{i}.{k}": (torch.randn(s, generator=gen) * 0.02).half() for k, s in shapes.items()}
    out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    return out


def build(out: Path, cfg: dict = CONFIG, seed: int = 0) -> Path:
    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    shards = [{"model.embed_tokens.weight": (torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=gen) * 0.02).half()}]
    shards += [layer_tensors(i, cfg, gen) for i in range(cfg["num_hidden_layers"])]
    shards.append({"model.norm.weight": torch.ones(cfg["hidden_size"], dtype=torch.float16),
                   "lm_head.weight": (torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=gen) * 0.02).half()})
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = ROOT / "tests" / "fixtures" / "tokenizers" / "llama2"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, out / f)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.home() / ".cache" / "flm" / "bench" / "llama-1.1b"
    print(build(target))
