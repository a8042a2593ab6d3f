"""SentencePiece `tokenizer.model` files, read without sentencepiece or protobuf.

Checkpoints of InternLM, InternLM2, Yi and Baichuan ship their tokenizer only as a SentencePiece
model. Converting them needs its pieces and scores (fastllm's vocab table) and two switches of
its normalizer that decide the ids as much as the pieces do: whether a space is prepended to the
text (`add_dummy_prefix`) and whether runs of spaces collapse (`remove_extra_whitespaces`). The
file is a protobuf message (sentencepiece_model.proto, proto2); the few fields read here are
parsed from the wire format directly, so conversion needs neither package:

  ModelProto:     pieces = 1 (repeated), trainer_spec = 2, normalizer_spec = 3
  SentencePiece:  piece = 1 (string), score = 2 (float), type = 3 (enum, NORMAL when absent)
  TrainerSpec:    model_type = 3 (UNIGRAM = 1, BPE = 2), byte_fallback = 35
  NormalizerSpec: name = 1, add_dummy_prefix = 3 (default true),
                  remove_extra_whitespaces = 4 (default true)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from ..errors import CheckpointError


class PieceType(IntEnum):
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Pieces transformers' tokenizers match whole in text (sentencepiece itself reads <s> as text)
MATCHED_IN_TEXT = (PieceType.UNKNOWN, PieceType.CONTROL, PieceType.USER_DEFINED)


@dataclass
class Piece:
    text: str
    score: float = 0.0
    type: PieceType = PieceType.NORMAL


@dataclass
class SentencePieceModel:
    pieces: list[Piece] = field(default_factory=list)
    model_type: int = 1  # UNIGRAM, the proto's default
    byte_fallback: bool = False
    normalizer: str = ""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True

    @property
    def is_bpe(self) -> bool:
        return self.model_type == 2


def _fields(data: bytes, where: str):
    """(field number, wire type, value) of one message: ints for varints, bytes otherwise."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise CheckpointError(f"{where}: truncated or malformed SentencePiece model")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
            continue
        size = {1: 8, 5: 4}.get(wire)
        if wire == 2:
            size = varint()
        if size is None or pos + size > len(data):
            raise CheckpointError(f"{where}: truncated or malformed SentencePiece model (wire type {wire})")
        yield number, wire, data[pos:pos + size]
        pos += size


def _text(value: bytes | int, where: str) -> str:
    if not isinstance(value, bytes):
        raise CheckpointError(f"{where}: malformed SentencePiece model (a string field holds a number)")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: a SentencePiece piece is not valid UTF-8 ({value[:16]!r})") from None


def parse_sentencepiece_model(data: bytes, where: str = "tokenizer.model") -> SentencePieceModel:
    """The pieces and switches of a serialized SentencePiece ModelProto."""
    model = SentencePieceModel()
    for number, _wire, value in _fields(data, where):
        if number == 1 and isinstance(value, bytes):
            piece = Piece("")
            for sub, wire, item in _fields(value, where):
                if sub == 1:
                    piece.text = _text(item, where)
                elif sub == 2 and wire == 5:
                    piece.score = struct.unpack("<f", item)[0]
                elif sub == 3 and isinstance(item, int):
                    piece.type = PieceType(item) if item in PieceType._value2member_map_ else PieceType.NORMAL
            model.pieces.append(piece)
        elif number == 2 and isinstance(value, bytes):
            for sub, _w, item in _fields(value, where):
                if sub == 3 and isinstance(item, int):
                    model.model_type = item
                elif sub == 35 and isinstance(item, int):
                    model.byte_fallback = bool(item)
        elif number == 3 and isinstance(value, bytes):
            for sub, _w, item in _fields(value, where):
                if sub == 1:
                    model.normalizer = _text(item, where)
                elif sub == 3 and isinstance(item, int):
                    model.add_dummy_prefix = bool(item)
                elif sub == 4 and isinstance(item, int):
                    model.remove_extra_whitespaces = bool(item)
    if not model.pieces:
        raise CheckpointError(f"{where}: no pieces; is this a SentencePiece tokenizer.model?")
    return model


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_sentencepiece_model(data, str(path))
