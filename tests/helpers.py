"""What the test modules share: tiny random-weight LLaMA checkpoints with the real Llama-2
tokenizer, the stored forms of a weight, and how logits are compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flm.kernels import ReferenceLinear
from flm.quant import DType, Quantized, quantize

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


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

# The quantized weight types the kernel tests cover: name -> (dtype, group size).
QUANTIZED = {"int8": (DType.INT8, 128), "int4": (DType.INT4_NOZERO, 128), "int4g32": (DType.INT4_GROUP, 32),
             "int4g128": (DType.INT4_GROUP, 128)}


def kernel_weights(name: str, w: torch.Tensor) -> tuple[torch.Tensor | Quantized, torch.Tensor]:
    """(w stored as `name` — float32, bfloat16, float16 or a QUANTIZED type —, the float32
    weights it stands for)."""
    if name == "float32":
        return w, w
    if name in ("bfloat16", "float16"):
        stored = w.to(getattr(torch, name))
        return stored, stored.float()
    q = quantize(w, *QUANTIZED[name])
    return q, ReferenceLinear(q, tuple(w.shape), None).dense()


def logits_close(got: torch.Tensor, want: torch.Tensor, relative: float) -> bool:
    """max |got - want| within `relative` of want's range: logits are judged against their own
    spread, which is what decides the next token (on any device, any float dtype)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).abs().max()) <= relative * float(want.max() - want.min())


def fused_rounds_input_once(fused, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch, times: int = 1) -> torch.Tensor:
    """fused(x), asserting that FusedLinear rounded x to int4's 16-bit grid with torch ops
    `times` times for all its parts (once; none where the parts' kernels round it) and that the
    result equals each part run alone, bit for bit; returns the result."""
    import flm.kernels as kernels
    from flm.quant import round_input_int16

    alone = torch.cat([p(x) for p in fused.parts], dim=-1)
    calls = []
    monkeypatch.setattr(kernels, "round_input_int16", lambda t: calls.append(t) or round_input_int16(t))
    got = fused(x)
    assert len(calls) == times
    torch.testing.assert_close(got, alone, rtol=0, atol=0)
    return got
