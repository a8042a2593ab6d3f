"""Tokenizers: fastllm's vocab+scores export, and the runtime tokenizer built on HF `tokenizers`.

The .flm keeps fastllm's vocab table (so fastllm can read our files) and, as the extra key
`flm.tokenizer_json`, the model's whole tokenizer.json, from which the runtime builds a
`tokenizers.Tokenizer` that gives Hugging Face's ids exactly.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from ..errors import TemplateError
from ..format import keys
from ..format.flm import VocabEntry
from ..format.sentencepiece import MATCHED_IN_TEXT, read_sentencepiece_model

FIX_TOKEN = re.compile(r"<FLM_FIX_TOKEN_(-?\d+)>")
FIX_TOKEN_START = "<FLM_FIX_TOKEN_"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SURROGATE = re.compile("[\ud800-\udfff]")


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {ch: b for b, ch in gpt2_byte_chars().items()}


@dataclass
class FastllmVocab:
    """What fastllm's torch2flm stores for a tokenizer: vocab, special tokens and flags."""

    entries: list[VocabEntry]
    special_tokens: list[str]
    kv: dict[str, str]


def _merge_strings(merges: list[Any]) -> list[str]:
    """tokenizer.json merges as fastllm joins them; they are "a b" strings or ["a", "b"] pairs."""
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge.replace(" ", ""))
        else:
            out.append("".join(merge))
    return out


def _has_dummy_prefix(data: dict[str, Any]) -> bool:
    def walk(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            yield node
            for key in ("normalizers", "pretokenizers"):
                for child in node.get(key) or []:
                    yield from walk(child)

    for node in walk(data.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend") in ("\u2581", " "):
            return True
    for node in walk(data.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
            if scheme != "never":
                return True
    return False


def _is_byte_level(data: dict[str, Any]) -> bool:
    decoder = data.get("decoder") or {}
    nodes = [decoder] + list(decoder.get("decoders") or [])
    return any(isinstance(n, dict) and n.get("type") == "ByteLevel" for n in nodes)


def fastllm_vocab_from_tokenizer_json(data: dict[str, Any]) -> FastllmVocab:
    """The vocab fastllm's torch2flm writes for a fast (tokenizer.json) tokenizer:
    token string bytes, id, score = -rank of the merge that makes it (0, -1, ...) else 1.0."""
    model = data.get("model") or {}
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    if isinstance(model.get("vocab"), list):  # Unigram: [piece, score] pairs, id = position
        vocab = {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
    for added in data.get("added_tokens") or []:
        vocab[added["content"]] = int(added["id"])
    merges = _merge_strings(model.get("merges") or [])
    ranks = dict(zip(merges, range(0, -len(merges), -1)))
    entries = [
        VocabEntry(piece.encode("utf-8", errors="surrogatepass"), token_id, float(ranks.get(piece, 1.0)))
        for piece, token_id in sorted(vocab.items(), key=lambda kv: kv[1])
    ]
    special = [a["content"] for a in sorted(data.get("added_tokens") or [], key=lambda a: a["id"]) if a.get("special")]
    kv = {keys.ADD_DUMMY_PREFIX: str(_has_dummy_prefix(data))}
    if _is_byte_level(data):
        kv[keys.BYTE_AS_CHAR] = "True"
    return FastllmVocab(entries, special, kv)


def fastllm_vocab_from_sentencepiece(model_file: str) -> FastllmVocab:
    """torch2flm's path for a tokenizer that is a SentencePiece model alone: its pieces with their
    own scores, and its normalizer's switches as tokenizer_* keys. Unknown, control and
    user-defined pieces are matched in text, as transformers' tokenizers do."""
    model = read_sentencepiece_model(model_file)
    if not model.is_bpe:
        raise TemplateError(f"{model_file} is a SentencePiece unigram model; flm rebuilds BPE vocabularies only. "
                            "Save a tokenizer.json beside it (transformers: AutoTokenizer.from_pretrained(...)"
                            ".save_pretrained(dir)) and convert again")
    entries = [VocabEntry(p.text.encode("utf-8"), i, p.score) for i, p in enumerate(model.pieces)]
    special = [p.text for p in model.pieces if p.type in MATCHED_IN_TEXT]
    kv = {keys.ADD_DUMMY_PREFIX: str(model.add_dummy_prefix)}
    if model.remove_extra_whitespaces:
        kv[keys.REMOVE_EXTRA_WHITESPACES] = "True"
    if "nfkc" in model.normalizer:
        kv[keys.NFKC] = "True"
    return FastllmVocab(entries, special, kv)


# ---------------------------------------------------------------- runtime


class Tokenizer:
    """Encode/decode with Hugging Face `tokenizers` semantics plus `<FLM_FIX_TOKEN_N>`."""

    def __init__(self, tokenizer_json: str, vocab_size: int | None = None, nfkc: bool = False):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise TemplateError(f"stored tokenizer.json cannot be loaded: {exc}") from None
        self.vocab_size = vocab_size or self._tok.get_vocab_size(with_added_tokens=True)
        self.byte_level = _is_byte_level(json.loads(tokenizer_json))
        # added tokens stand for their text, not for byte-level characters (DeepSeek's "<\uff5c...\uff5c>")
        self._added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        self.nfkc = nfkc  # XVERSE-13B-Chat V1 wants NFKC input; fastllm cannot do it

    def _clean(self, text: str) -> str:
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", text)  # lone surrogates cannot be UTF-8: as HF's slow path would
        return text

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no BOS/EOS added (fastllm's tokenizer_encode_string)."""
        if not text:
            return []
        return self._tok.encode(self._clean(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch([self._clean(t) for t in texts], add_special_tokens=False)]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Like encode, but `<FLM_FIX_TOKEN_N>` becomes id N, as in fastllm templates."""
        ids: list[int] = []
        pos = 0
        for match in FIX_TOKEN.finditer(prompt):
            ids += self.encode(prompt[pos : match.start()])
            token_id = int(match.group(1))
            if not 0 <= token_id < self.vocab_size:
                raise TemplateError(f"<FLM_FIX_TOKEN_{token_id}> is outside the vocabulary (size {self.vocab_size})")
            ids.append(token_id)
            pos = match.end()
        rest = prompt[pos:]
        if FIX_TOKEN_START in rest:
            raise TemplateError(f"unclosed or malformed {FIX_TOKEN_START}...> in prompt near {rest[rest.index(FIX_TOKEN_START):][:30]!r}")
        return ids + self.encode(rest)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (fastllm's tokenizer_decode_token)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        if _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        if self.byte_level:
            return bytes(_BYTE_DECODER.get(ch, 32) for ch in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def backend_json(self) -> str:
        """The `tokenizers` tokenizer.json this tokenizer runs (to store in a .flm)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class StreamDecoder:
    """Turns a growing token list into text pieces, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for its next bytes
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return piece

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)


def load_tokenizer_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"tokenizer.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise TemplateError("tokenizer.json has no 'model' section")
    return data
