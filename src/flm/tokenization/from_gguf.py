"""A tokenizer.json for a GGUF model, from the vocabulary GGUF carries (tokenizer.ggml.*).

Byte-level vocabularies ("gpt2") keep their exact merges and get the split llama.cpp names in
`tokenizer.ggml.pre`; SentencePiece ones ("llama") go through the same rebuild as fastllm's
vocab+scores tables (pieces, scores, dummy prefix). Control tokens become special tokens,
user-defined ones plain added tokens, as llama.cpp's converter took them from Hugging Face.
"""

from __future__ import annotations

import logging

from ..errors import CheckpointError
from ..format import keys
from ..format.flm import VocabEntry
from ..format.gguf import PRE_SPLITS, GGUFFile
from ..format.sentencepiece import (  # GGUF token types number the same way
    MATCHED_IN_TEXT,
    PieceType,
)
from .byte_level_splits import split_named
from .files import TokenizerFiles
from .from_vocab import tokenizer_from_vocab

log = logging.getLogger("flm")


def byte_level_tokenizer_json(tokens: list[str], types: list[int], merges: list[str], pre: str | None) -> str:
    """tokenizer.json of a GGUF byte-level vocabulary: its merges as they are, the split `pre` names."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    split = split_named(PRE_SPLITS.get(pre or "", ""))
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=split.ignore_merges))
    split.configure(tok)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == PieceType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == PieceType.USER_DEFINED])
    return tok.to_str()


def gguf_tokenizer_files(gguf: GGUFFile) -> TokenizerFiles:
    """tokenizer.json, special tokens and chat template of a GGUF model, as the converter takes them."""
    files = TokenizerFiles()
    tokens = gguf.value("tokenizer.ggml.tokens")
    if not tokens:
        return files
    types = gguf.value("tokenizer.ggml.token_type") or [1] * len(tokens)
    kind = gguf.value("tokenizer.ggml.model")
    if kind == "gpt2":
        merges = gguf.value("tokenizer.ggml.merges") or []
        files.tokenizer_json = byte_level_tokenizer_json(tokens, types, merges, gguf.value("tokenizer.ggml.pre"))
    elif kind == "llama":
        scores = gguf.value("tokenizer.ggml.scores") or [0.0] * len(tokens)
        if len(set(scores)) == 1:
            log.warning("%s: every piece has the same score (llama.cpp wrote it from a tokenizer.json), so merge "
                        "order is lost; ids may differ from the original tokenizer (e.g. on runs of spaces). "
                        "Convert the Hugging Face folder for exact ids", gguf.path.name)
        entries = [VocabEntry(t.encode("utf-8"), i, float(s)) for i, (t, s) in enumerate(zip(tokens, scores))]
        special = [t for t, k in zip(tokens, types) if k in MATCHED_IN_TEXT]
        kv = {keys.ADD_DUMMY_PREFIX: str(bool(gguf.value("tokenizer.ggml.add_space_prefix", True)))}
        files.tokenizer_json = tokenizer_from_vocab(entries, special, kv).backend_json()
    else:
        raise CheckpointError(f"{gguf.path}: GGUF tokenizer model {kind!r} is not supported (flm reads 'gpt2' and 'llama')")
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                       ("pad_token", "padding_token_id")):
        token_id = gguf.value(f"tokenizer.ggml.{field}")
        if token_id is not None and 0 <= token_id < len(tokens):
            files.tokenizer_config[key] = tokens[token_id]
    for key in ("add_bos_token", "add_eos_token"):
        value = gguf.value(f"tokenizer.ggml.{key}")
        if value is not None:
            files.tokenizer_config[key] = bool(value)
    files.chat_template = gguf.value("tokenizer.chat_template")
    return files
