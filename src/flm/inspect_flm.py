"""`flm inspect`: what a .flm file holds, for files written by flm or by fastllm."""

from __future__ import annotations

import os
from collections import Counter

from .config import parse_scalar
from .format import keys
from .format.flm import FlmFile, read_flm
from .format.keys import TOKENIZER_JSON_KEY
from .quant import FLOAT_DTYPES
from .tokenization.byte_level_splits import byte_level_split

LONG_VALUE = 80


def _short(value: str) -> str:
    one_line = value.replace("\n", "\\n")
    if len(one_line) <= LONG_VALUE:
        return one_line
    return f"{one_line[:LONG_VALUE - 20]}... ({len(value)} chars)"


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _tokenizer_source(flm: FlmFile) -> str:
    """Where the runtime's tokenizer comes from: the stored tokenizer.json, or a rebuild from the
    vocab table (fastllm's files), with the split a byte-level rebuild will use."""
    if TOKENIZER_JSON_KEY in flm.kv:
        return "tokenizer.json stored"
    if not flm.vocab:
        return "no tokenizer"
    if not parse_scalar(flm.kv.get(keys.BYTE_AS_CHAR, "False")):
        return "rebuilt from vocab+scores (SentencePiece-style BPE)"
    vocab = {e.piece.decode("utf-8", errors="replace"): e.token_id for e in flm.vocab}
    return f"rebuilt from vocab+scores (byte-level BPE, {byte_level_split(vocab).name} split)"


def describe(flm: FlmFile) -> str:
    lines = [f"file: {flm.path}", f"size: {_size(os.path.getsize(flm.path))}", f"version: {flm.version}",
             f"key/values ({len(flm.kv)}):"]
    width = max((len(k) for k in flm.kv), default=0)
    lines += [f"  {k.ljust(width)}  {_short(v)}" for k, v in flm.kv.items()]
    lines.append(f"tokenizer: {len(flm.vocab)} vocab entries, {len(flm.special_tokens)} special tokens, "
                 f"{_tokenizer_source(flm)}")
    if flm.special_tokens:
        lines.append("  special: " + _short(" ".join(flm.special_tokens)))
    lines.append(f"tensors ({len(flm.tensors)}):")
    name_width = max((len(n) for n in flm.tensors), default=0)
    total = 0
    by_dtype: Counter[str] = Counter()
    for rec in flm.tensors.values():
        extra = 0 if rec.dtype in FLOAT_DTYPES else 8 * rec.dims[0] * rec.group
        nbytes = rec.data_nbytes + extra
        total += nbytes
        by_dtype[rec.dtype.name] += 1
        dtype = rec.dtype.name.lower() + (f"(g{rec.group_cnt})" if rec.group_cnt else "")
        lines.append(f"  {rec.name.ljust(name_width)}  {str(list(rec.dims)):>16}  {dtype:>16}  {_size(nbytes):>10}")
    lines.append(f"total tensor bytes: {_size(total)} ({', '.join(f'{n} {d.lower()}' for d, n in sorted(by_dtype.items()))})")
    return "\n".join(lines)


def inspect_file(path: str) -> str:
    flm = read_flm(path)
    try:
        return describe(flm)
    finally:
        flm.close()
