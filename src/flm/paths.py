"""Where flm keeps what it downloads, converts and compiles."""

from __future__ import annotations

from pathlib import Path

from .settings import setting


def cache_dir() -> Path:
    """FLM_CACHE, else ~/.cache/flm."""
    return Path(setting("FLM_CACHE") or Path.home() / ".cache" / "flm")


def kernel_build_dir() -> Path:
    """Compiled CPU kernels, one folder per torch version, instruction set and source hash."""
    return cache_dir() / "torch_extensions"
