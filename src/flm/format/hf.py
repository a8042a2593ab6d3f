"""Lazy Hugging Face checkpoint reading: one tensor at a time, never the whole model.

safetensors files are parsed here directly (8-byte header length, JSON header, raw data) and
each tensor is read with a positioned read into its own buffer, so peak memory is one tensor
and no file stays memory-mapped (an mmap'd shard would keep every page it touched resident).
`.bin` shards go through `torch.load(mmap=True, weights_only=True)`, one shard at a time.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from ..errors import CheckpointError

_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 << 20


class TensorSource(Protocol):
    """What the converter needs from a checkpoint: names, shapes and one tensor at a time."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> torch.Tensor: ...


@dataclass
class _SafetensorsEntry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _read_safetensors_header(path: Path) -> dict[str, _SafetensorsEntry]:
    size = path.stat().st_size
    with open(path, "rb") as fo:
        head = fo.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: safetensors header length {header_len} is impossible")
        try:
            header = json.loads(fo.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    base = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or malformed header entry") from None
        numel = 1
        for d in shape:
            numel *= d
        if start < 0 or end < start or base + end > size or end - start != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} points outside the file or has the wrong byte size")
        entries[name] = _SafetensorsEntry(path, dtype, shape, base + start, base + end)
    return entries


class HFCheckpoint:
    """A model directory: config.json, generation_config.json, weights, tokenizer files."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory (expected a Hugging Face model folder)")
        self.config = self._json("config.json", required=True)
        self.generation_config = self._json("generation_config.json") or {}
        self._safetensors: dict[str, _SafetensorsEntry] = {}
        self._bin_files: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._bin_shapes: dict[str, tuple[int, ...]] = {}
        self._index_weights()

    def _json(self, name: str, required: bool = False) -> dict[str, Any] | None:
        path = self.dir / name
        if not path.exists():
            if required:
                raise CheckpointError(f"{self.dir}: no {name}; a Hugging Face model folder needs one")
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return data

    def _index_weights(self) -> None:
        safetensors = sorted(self.dir.glob("*.safetensors"))
        index = self._json("model.safetensors.index.json")
        if index and "weight_map" in index:
            safetensors = sorted({self.dir / f for f in index["weight_map"].values()})
            missing = [str(p.name) for p in safetensors if not p.exists()]
            if missing:
                raise CheckpointError(f"{self.dir}: index lists shards that are missing: {', '.join(missing)}")
        for path in safetensors:
            self._safetensors.update(_read_safetensors_header(path))
        if self._safetensors:
            return
        bins = sorted(self.dir.glob("pytorch_model*.bin"))
        bin_index = self._json("pytorch_model.bin.index.json")
        if bin_index and "weight_map" in bin_index:
            for name, fname in bin_index["weight_map"].items():
                self._bin_files[name] = self.dir / fname
        else:
            for path in bins:
                for name, tensor in self._load_bin(path).items():
                    self._bin_files[name] = path
                    self._bin_shapes[name] = tuple(tensor.shape)
        if not self._bin_files:
            raise CheckpointError(
                f"{self.dir}: no weights found (expected *.safetensors or pytorch_model*.bin)"
            )

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != path:
            self._bin_cache = None  # drop the previous shard's map before opening the next
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # torch raises many kinds for a bad pickle
                raise CheckpointError(f"{path}: cannot load as a weights-only torch checkpoint ({exc})") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: expected a state dict")
            self._bin_cache = (path, state)
        return self._bin_cache[1]

    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, offset order)."""
        if self._safetensors:
            return sorted(self._safetensors, key=lambda n: (str(self._safetensors[n].path), self._safetensors[n].start))
        return list(self._bin_files)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._safetensors:
            return self._safetensors[name].shape
        if name not in self._bin_shapes:
            self._bin_shapes[name] = tuple(self._bin_tensor(name).shape)
        return self._bin_shapes[name]

    def _bin_tensor(self, name: str) -> torch.Tensor:
        if name not in self._bin_files:
            raise CheckpointError(f"{self.dir}: no tensor named {name!r}")
        state = self._load_bin(self._bin_files[name])
        if name not in state:
            raise CheckpointError(f"{self._bin_files[name]}: the index lists {name!r} but the shard lacks it")
        return state[name]

    def read(self, name: str) -> torch.Tensor:
        entry = self._safetensors.get(name)
        if entry is None:
            return self._bin_tensor(name)
        buf = bytearray(entry.end - entry.start)
        with open(entry.path, "rb") as fo:
            fo.seek(entry.start)
            if fo.readinto(buf) != len(buf):
                raise CheckpointError(f"{entry.path}: truncated while reading {name!r}")
        if not buf:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return torch.frombuffer(buf, dtype=entry.dtype).reshape(entry.shape)

    def tokenizer_files(self) -> Iterator[Path]:
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"):
            if (self.dir / name).exists():
                yield self.dir / name


class StateDictSource:
    """A TensorSource over an in-memory state dict (torch2flm.tofile, llm.from_hf)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self.state[name].detach()
