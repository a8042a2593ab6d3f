"""The .flm container: read versions 0, 1 and 2 (ours and fastllm's), write version 2.

Layout (little-endian, every integer int32, see fastllm's WeightMap::LoadFromFile):
  version
  [v>=1] kv count, then (string key, string value) pairs        string = int32 length + UTF-8
  [kv peft_size] adapters (name, kv count, pairs)                  read and kept, never written
  vocab count, then per token: byte count, each byte as int32, token id, [score float32 when
      kv tokenizer_use_score == "1"]
  [kv tokenizer_has_special_tokens == "1"] count, then strings
  tensor count, then per tensor: name, ndims, dims, data-type code, payload:
      float32/bfloat16/float16: raw elements
      int8/int4/int4-nozero: axis, (min, max) float32 per channel, packed bytes
      int4-group: axis, group, group_cnt, (min, max) per channel*group, packed bytes

The reader treats the file as untrusted: every count and length is checked against the bytes
that remain before anything is allocated, and every failure is an FlmFormatError naming the
file, the offset and the problem. Tensor payloads are not copied: records keep offsets into
a read-only memory map.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
import torch

from ..errors import FlmError, FlmFormatError, UnsupportedDtypeError
from ..quant import (
    FLOAT_DTYPES,
    DType,
    Quantized,
    dtype_code,
    quantize,
    quantized_nbytes,
)
from . import keys

MAX_DIMS = 8
WRITE_VERSION = 2
_ELEMENT_BYTES = {DType.FLOAT32: 4, DType.BFLOAT16: 2, DType.FLOAT16: 2}


@dataclass
class VocabEntry:
    piece: bytes
    token_id: int
    score: float


@dataclass
class TensorRecord:
    """Where one tensor lives in the file and how to interpret it."""

    name: str
    dims: tuple[int, ...]
    dtype: DType
    data_offset: int  # first byte of the element data / packed data
    data_nbytes: int
    axis: int = -1
    group: int = 1
    group_cnt: int = 0
    mins: torch.Tensor | None = None
    maxs: torch.Tensor | None = None
    memory: torch.Tensor | None = None  # the bytes, when built at load (rows_of) instead of mapped

    @property
    def quantized(self) -> bool:
        return self.dtype not in FLOAT_DTYPES

    @property
    def numel(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) if self.dims else 1


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux's value; Python 3.11's mmap lacks the name


@dataclass
class FlmFile:
    """A parsed .flm file; tensor data stays in the memory map until asked for."""

    path: Path
    version: int
    kv: dict[str, str]
    vocab: list[VocabEntry]
    special_tokens: list[str]
    tensors: dict[str, TensorRecord]
    peft: dict[str, dict[str, str]] = field(default_factory=dict)
    _map: mmap.mmap | None = None
    _buffer: memoryview | None = None

    def raw(self, rec: TensorRecord) -> torch.Tensor:
        """The stored bytes of a tensor as a uint8 tensor backed by the map (no copy)."""
        if rec.memory is not None:
            return rec.memory
        if rec.data_nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the map is read-only; flm never writes through it
            return torch.frombuffer(self._buffer, dtype=torch.uint8, count=rec.data_nbytes, offset=rec.data_offset)

    def float_tensor(self, rec: TensorRecord) -> torch.Tensor:
        """A float tensor in its file dtype; shares the map when the offset is aligned."""
        torch_dtype = FLOAT_DTYPES[rec.dtype]
        raw = self.raw(rec)
        if rec.data_offset % _ELEMENT_BYTES[rec.dtype]:
            raw = raw.clone()  # an odd-length name left the data unaligned: copy this one tensor
        return raw.view(torch_dtype).reshape(rec.dims)

    def quantized(self, rec: TensorRecord) -> Quantized:
        return Quantized(rec.dtype, rec.mins, rec.maxs, self.raw(rec), rec.group, rec.group_cnt)

    def prefault(self) -> None:
        """Map every page of the file now rather than on first touch (llama.cpp's MAP_POPULATE):
        otherwise the first prompt pays a page fault per 4 KB of weights (1.1B float16: 0.3 s
        from the page cache, several seconds from disk). Falls back to read-ahead where the
        kernel lacks MADV_POPULATE_READ (Linux < 5.14); a no-op where mmap has no madvise."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        for advice in (MADV_POPULATE_READ, getattr(mmap, "MADV_WILLNEED", None)):
            if advice is None:
                continue
            try:
                self._map.madvise(advice)
                return
            except OSError:
                continue

    def close(self) -> None:
        self._buffer = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # tensors still share the map; it closes when they are gone
            self._map = None


def rows_of(flm: FlmFile, rec: TensorRecord, rows: torch.Tensor, name: str) -> TensorRecord:
    """Rows `rows` of a stored 1-D or 2-D tensor as a new record named `name`, bytes copied into
    memory in the stored dtype (quantized rows keep their codes and ranges): how a packed tensor
    that fastllm's writer kept whole (InternLM2's wqkv) becomes the separate q, k and v."""
    count = rec.dims[0] if rec.dims else 0
    cols = int(np.prod(rec.dims[1:], dtype=np.int64)) if len(rec.dims) > 1 else 1
    if len(rec.dims) not in (1, 2) or (rec.dtype in (DType.INT4, DType.INT4_NOZERO, DType.INT4_GROUP) and cols % 2):
        raise FlmFormatError(flm.path, f"tensor {rec.name} of shape {list(rec.dims)} ({rec.dtype.name}) "
                                       "cannot be split into rows")
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= count):
        raise FlmFormatError(flm.path, f"tensor {rec.name} has {count} rows, fewer than its split needs")
    row_bytes = rec.data_nbytes // count if count else 0
    data = flm.raw(rec).view(count, row_bytes).index_select(0, rows).reshape(-1)
    ranges = {}
    if rec.quantized:
        per_row = rec.mins.numel() // count  # a range per row, or per group of a row
        ranges = {key: getattr(rec, key).view(count, per_row).index_select(0, rows).reshape(-1)
                  for key in ("mins", "maxs")}
    return replace(rec, name=name, dims=(len(rows), *rec.dims[1:]), data_offset=0, data_nbytes=data.numel(),
                   memory=data, **ranges)


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, problem: str) -> FlmFormatError:
        return FlmFormatError(self.path, f"{problem} (at byte {self.pos} of {len(self.buf)})")

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or nbytes > self.remaining():
            raise self.fail(f"{what} needs {nbytes} bytes but only {self.remaining()} remain: file truncated or corrupt")

    def int32(self, what: str) -> int:
        self.need(4, what)
        (value,) = struct.unpack_from("<i", self.buf, self.pos)
        self.pos += 4
        return value

    def float32(self, what: str) -> float:
        self.need(4, what)
        (value,) = struct.unpack_from("<f", self.buf, self.pos)
        self.pos += 4
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.int32(what)
        if n < 0 or n * min_item_bytes > self.remaining():
            raise self.fail(f"{what} is {n}, impossible for the {self.remaining()} bytes that remain")
        return n

    def string(self, what: str) -> str:
        n = self.int32(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="surrogateescape")

    def floats(self, n: int, what: str) -> np.ndarray:
        self.need(4 * n, what)
        arr = np.frombuffer(self.buf, dtype="<f4", count=n, offset=self.pos)
        self.pos += 4 * n
        return arr


def read_flm(path: str | os.PathLike) -> FlmFile:
    """Parse a .flm file (version 0, 1 or 2) written by flm or by fastllm."""
    path = Path(path)
    try:
        fd = open(path, "rb")
    except OSError as exc:
        raise FlmFormatError(path, f"cannot open: {exc.strerror or exc}") from None
    with fd:
        size = os.fstat(fd.fileno()).st_size
        if size < 4:
            raise FlmFormatError(path, f"only {size} bytes: not a .flm file")
        mapped = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_READ)
    _advise_huge_pages(mapped)
    buf = memoryview(mapped)
    try:
        return _parse(path, buf, mapped)
    except FlmFormatError:
        _release(buf, mapped)
        raise
    except (struct.error, ValueError, OverflowError, UnsupportedDtypeError) as exc:
        _release(buf, mapped)
        raise FlmFormatError(path, f"corrupt file: {exc}") from None


def _advise_huge_pages(mapped: mmap.mmap) -> None:
    """Ask for 2 MB pages before the parse touches the file: pages then read from disk come in
    2 MB folios, mapped 2 MB at a time, which decode streams faster than 4 KB pages (fewer TLB
    misses). Advised before the parse, since its faults around each tensor header would
    otherwise read most of the file in small folios first (bench/HISTORY.md, "Streaming weights
    on Zen 4"). Pages already in the page cache stay as they were read or written."""
    try:
        mapped.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass  # no madvise, or no transparent huge pages on this system


def _release(buf: memoryview, mapped: mmap.mmap) -> None:
    """Unmap after a failed parse; views still held by a traceback keep it until collected."""
    try:
        buf.release()
        mapped.close()
    except BufferError:
        pass


def _parse(path: Path, buf: memoryview, mapped: mmap.mmap) -> FlmFile:
    cur = _Cursor(buf, path)
    version = cur.int32("version")
    if version not in (0, 1, 2):
        raise cur.fail(f"unknown .flm version {version} (flm reads 0, 1 and 2)")
    kv: dict[str, str] = {}
    if version >= 1:
        for _ in range(cur.count("key/value count", 8)):
            key = cur.string("key")
            kv[key] = cur.string(f"value of {key!r}")
    peft: dict[str, dict[str, str]] = {}
    if "peft_size" in kv:
        try:
            n_adapters = int(kv["peft_size"])
        except ValueError:
            raise cur.fail(f"peft_size {kv['peft_size']!r} is not an integer") from None
        if n_adapters < 0 or n_adapters * 8 > cur.remaining():
            raise cur.fail(f"peft_size {n_adapters} is impossible")
        for _ in range(n_adapters):
            name = cur.string("adapter name")
            peft[name] = {}
            for _ in range(cur.count("adapter key/value count", 8)):
                key = cur.string("adapter key")
                peft[name][key] = cur.string("adapter value")

    use_score = kv.get(keys.USE_SCORE) == "1"
    vocab = _read_vocab(cur, use_score)
    special: list[str] = []
    if kv.get(keys.HAS_SPECIAL_TOKENS) == "1":
        special = [cur.string("special token") for _ in range(cur.count("special token count", 4))]
    tensors: dict[str, TensorRecord] = {}
    for _ in range(cur.count("tensor count", 12)):
        rec = _read_tensor(cur)
        if rec.name in tensors:
            raise cur.fail(f"tensor {rec.name!r} appears twice")
        tensors[rec.name] = rec
    return FlmFile(path, version, kv, vocab, special, tensors, peft, mapped, buf)


def _read_vocab(cur: _Cursor, use_score: bool) -> list[VocabEntry]:
    n = cur.count("vocab size", 8)
    vocab = []
    buf = cur.buf
    for i in range(n):
        length = cur.int32("token length")
        if length < 0:
            raise cur.fail(f"token {i} has negative length {length}")
        cur.need(4 * length + 4 + (4 if use_score else 0), f"token {i}")
        codes = np.frombuffer(buf, dtype="<i4", count=length, offset=cur.pos)
        cur.pos += 4 * length
        if length and (codes.min() < -128 or codes.max() > 255):
            raise cur.fail(f"token {i} has a byte value outside -128..255")
        piece = (codes & 0xFF).astype(np.uint8).tobytes()
        token_id = cur.int32("token id")
        score = cur.float32("token score") if use_score else float(-i)
        vocab.append(VocabEntry(piece, token_id, score))
    return vocab


def _read_tensor(cur: _Cursor) -> TensorRecord:
    name = cur.string("tensor name")
    ndims = cur.int32(f"dimension count of {name!r}")
    if not 0 <= ndims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {ndims} dimensions (0..{MAX_DIMS} allowed)")
    dims = tuple(cur.int32(f"dims of {name!r}") for _ in range(ndims))
    if any(d < 0 for d in dims):
        raise cur.fail(f"tensor {name!r} has a negative dimension {dims}")
    code = cur.int32(f"data type of {name!r}")
    try:
        dtype = dtype_code(code)
    except UnsupportedDtypeError:
        raise cur.fail(f"tensor {name!r} has unknown data type code {code}") from None
    numel = int(np.prod(dims, dtype=np.float64)) if dims else 1
    if numel > cur.remaining() * 2 + 2:
        raise cur.fail(f"tensor {name!r} of shape {dims} cannot fit in the bytes that remain")
    if dtype in FLOAT_DTYPES:
        nbytes = numel * _ELEMENT_BYTES[dtype]
        cur.need(nbytes, f"data of {name!r}")
        rec = TensorRecord(name, dims, dtype, cur.pos, nbytes)
        cur.pos += nbytes
        return rec
    if ndims != 2:
        raise cur.fail(f"quantized tensor {name!r} must be 2-D, has shape {dims}")
    axis = cur.int32(f"channel axis of {name!r}")
    if axis != 0:
        raise cur.fail(f"tensor {name!r} has channel axis {axis}; fastllm writes per-row (axis 0) only")
    group, group_cnt = 1, 0
    if dtype == DType.INT4_GROUP:
        group = cur.int32(f"group count of {name!r}")
        group_cnt = cur.int32(f"group size of {name!r}")
        if group < 1 or group_cnt < 1 or group * group_cnt < dims[1] or (group - 1) * group_cnt >= dims[1] > 0:
            raise cur.fail(f"tensor {name!r}: {group} groups of {group_cnt} do not cover a row of {dims[1]}")
    channels = dims[0] * group
    pairs = cur.floats(2 * channels, f"quantization ranges of {name!r}").reshape(channels, 2)
    nbytes = quantized_nbytes(dtype, dims[0], dims[1])
    cur.need(nbytes, f"data of {name!r}")
    rec = TensorRecord(
        name, dims, dtype, cur.pos, nbytes, axis, group, group_cnt,
        torch.from_numpy(pairs[:, 0].copy()), torch.from_numpy(pairs[:, 1].copy()),
    )
    cur.pos += nbytes
    return rec


# ---------------------------------------------------------------- writer

def _int32(value: int) -> bytes:
    return struct.pack("<i", value)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8", errors="surrogateescape")
    return _int32(len(raw)) + raw


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


ROW_BLOCK_BYTES = 32 << 20  # rows converted or quantized at a time: bounds peak memory


class FlmWriter:
    """Writes a version-2 .flm to a temporary file and renames it into place only when complete.

    Use as a context manager; an exception (or Ctrl-C) inside the block removes the partial file
    and leaves whatever was at the target path untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fo: BinaryIO | None = None
        self._tmp: str | None = None
        self._tensors_left: int | None = None

    def __enter__(self) -> "FlmWriter":
        directory = self.path.parent if str(self.path.parent) else Path(".")
        directory.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=directory)
        self._fo = os.fdopen(fd, "wb", buffering=1 << 20)
        self._fo.write(_int32(WRITE_VERSION))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._fo is not None and self._tmp is not None
        complete = exc_type is None and self._tensors_left == 0
        try:
            if complete:
                self._fo.flush()
                # mkstemp makes the file private (0600); give it the mode a plain open() would
                os.fchmod(self._fo.fileno(), 0o666 & ~_umask())
                os.fsync(self._fo.fileno())
            self._fo.close()
            if complete:
                os.replace(self._tmp, self.path)
        finally:
            if not complete and os.path.exists(self._tmp):
                os.unlink(self._tmp)
        if exc_type is None and not complete:
            raise FlmError(f"{self.path}: not written: {self._tensors_left} announced tensors are missing")

    def write_header(self, kv: dict[str, str], vocab: Iterable[VocabEntry], special_tokens: list[str] | None) -> None:
        """Key/value table, vocab (always with scores) and, when flagged, the special tokens."""
        fo = self._fo
        vocab = list(vocab)
        kv = dict(kv)
        if vocab:
            kv[keys.USE_SCORE] = "1"
        if special_tokens:
            kv[keys.HAS_SPECIAL_TOKENS] = "1"
        fo.write(_int32(len(kv)))
        for key, value in kv.items():
            fo.write(_string(str(key)) + _string(str(value)))
        use_score = kv.get(keys.USE_SCORE) == "1"
        fo.write(_int32(len(vocab)))
        for entry in vocab:
            codes = np.frombuffer(entry.piece, dtype=np.uint8).astype("<i4")
            fo.write(_int32(len(entry.piece)) + codes.tobytes() + _int32(entry.token_id))
            if use_score:
                fo.write(struct.pack("<f", entry.score))
        if kv.get(keys.HAS_SPECIAL_TOKENS) == "1":
            special_tokens = special_tokens or []
            fo.write(_int32(len(special_tokens)))
            for token in special_tokens:
                fo.write(_string(token))

    def begin_tensors(self, count: int) -> None:
        self._fo.write(_int32(count))
        self._tensors_left = count

    def _tensor_header(self, name: str, dims: tuple[int, ...], dtype: DType) -> None:
        if self._tensors_left is None or self._tensors_left <= 0:
            raise RuntimeError("more tensors written than announced by begin_tensors")
        self._tensors_left -= 1
        self._fo.write(_string(name) + _int32(len(dims)) + b"".join(_int32(d) for d in dims) + _int32(int(dtype)))

    def write_tensor(self, name: str, tensor: torch.Tensor, dtype: DType, group_cnt: int = 128,
                     quantizer: str = "fastllm") -> None:
        """Convert or quantize `tensor` to `dtype` block by block of rows and append it."""
        tensor = tensor.detach()
        dims = tuple(tensor.shape)
        self._tensor_header(name, dims, dtype)
        if dtype in FLOAT_DTYPES:
            self._write_float(tensor, FLOAT_DTYPES[dtype])
        else:
            self._write_quantized(tensor, dtype, group_cnt, quantizer)

    def _row_blocks(self, tensor: torch.Tensor) -> Iterable[torch.Tensor]:
        flat = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
        row_bytes = max(1, flat.shape[1] * 4)
        step = max(1, ROW_BLOCK_BYTES // row_bytes)
        for start in range(0, flat.shape[0], step):
            yield flat[start : start + step]

    def _write_float(self, tensor: torch.Tensor, torch_dtype: torch.dtype) -> None:
        for block in self._row_blocks(tensor):
            out = block.to(torch_dtype).contiguous()
            self._fo.write(out.reshape(-1).view(torch.uint8).numpy().tobytes())

    def _write_quantized(self, tensor: torch.Tensor, dtype: DType, group_cnt: int, quantizer: str) -> None:
        if tensor.dim() != 2:
            raise UnsupportedDtypeError(f"only 2-D weights can be quantized, got shape {tuple(tensor.shape)}")
        rows, cols = tensor.shape
        fo = self._fo
        fo.write(_int32(0))  # per-channel along axis 0
        group = 1
        if dtype == DType.INT4_GROUP:
            group = cols // group_cnt
            fo.write(_int32(group) + _int32(group_cnt))
        ranges_at = fo.tell()
        fo.write(b"\0" * (8 * rows * group))  # filled in once every block is quantized
        ranges = []
        for block in self._row_blocks(tensor):
            q = quantize(block, dtype, group_cnt, quantizer)
            fo.write(q.data.numpy().tobytes())
            ranges.append(torch.stack([q.mins, q.maxs], dim=1))
        end = fo.tell()
        fo.seek(ranges_at)
        fo.write(torch.cat(ranges).to(torch.float32).numpy().astype("<f4").tobytes())
        fo.seek(end)

    def copy_tensor(self, source: FlmFile, rec: TensorRecord) -> None:
        """Append a tensor exactly as another .flm stores it (no requantization)."""
        self._tensor_header(rec.name, rec.dims, rec.dtype)
        fo = self._fo
        if rec.quantized:
            fo.write(_int32(rec.axis))
            if rec.dtype == DType.INT4_GROUP:
                fo.write(_int32(rec.group) + _int32(rec.group_cnt))
            pairs = torch.stack([rec.mins, rec.maxs], dim=1).numpy().astype("<f4")
            fo.write(pairs.tobytes())
        fo.write(source.raw(rec).numpy().tobytes())


def rewrite_flm(source: FlmFile, path: str | os.PathLike) -> None:
    """Write `source` back out unchanged (version 2): write -> read -> write is byte-identical."""
    kv = {k: v for k, v in source.kv.items()}
    with FlmWriter(path) as writer:
        writer.write_header(kv, source.vocab, source.special_tokens)
        writer.begin_tensors(len(source.tensors))
        for rec in source.tensors.values():
            writer.copy_tensor(source, rec)
