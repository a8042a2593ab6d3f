"""SentencePiece tokenizer.model files for the tests, encoded here (protobuf wire format) from the
Llama-2 tokenizer.json fixture: the same pieces, ids and merge order as Llama-2's own model, with
the normalizer switches a test asks for (InternLM2 and Yi ship models without the dummy prefix)."""

from __future__ import annotations

import json
import re
import struct

from helpers import LLAMA2_TOKENIZER


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _key(number, 0) + _varint(value)


def encode_model(pieces: list[tuple[str, float, int]], *, model_type: int = 2, add_dummy_prefix: bool = True,
                 remove_extra_whitespaces: bool = False, normalizer: str = "identity") -> bytes:
    """A ModelProto: pieces (text, score, type), a BPE trainer spec with byte fallback, a normalizer."""
    out = b"".join(_bytes_field(1, _bytes_field(1, text.encode()) + _key(2, 5) + struct.pack("<f", score)
                                + _int_field(3, kind)) for text, score, kind in pieces)
    out += _bytes_field(2, _int_field(3, model_type) + _int_field(4, len(pieces)) + _int_field(35, 1))
    return out + _bytes_field(3, _bytes_field(1, normalizer.encode()) + _int_field(3, int(add_dummy_prefix))
                              + _int_field(4, int(remove_extra_whitespaces)) + _int_field(5, 1))


def llama2_pieces() -> list[tuple[str, float, int]]:
    """Llama-2's pieces by id: <unk> unknown, <s> </s> control, <0xNN> bytes, the rest scored by
    the rank of the merge that makes them (Llama-2's own model ranks "\u2581\u2581" last, as its
    tokenizer.json's merges do)."""
    data = json.loads((LLAMA2_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["merges"]]
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), i)
    pieces = []
    for text, token_id in sorted(data["vocab"].items(), key=lambda kv: kv[1]):
        kind = {"<unk>": 2, "<s>": 3, "</s>": 3}.get(text, 6 if re.fullmatch(r"<0x[0-9A-F]{2}>", text) else 1)
        pieces.append((text, -float(rank.get(text, 0)) if kind == 1 else 0.0, kind))
    return pieces
