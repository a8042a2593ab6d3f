"""Rebuild a tokenizer from fastllm's vocab+scores, for .flm files without a stored tokenizer.json
(files written by fastllm's own torch2flm).

Merges are derived from the scores the way transformers converts a SentencePiece model
(`SentencePieceExtractor`): every split of a piece into two vocab pieces is a merge, ranked by
the piece's score. fastllm stores SentencePiece scores (slow tokenizers) or -merge_rank (fast
ones); both rank merges correctly.
"""

from __future__ import annotations

from .config import parse_scalar
from .errors import TemplateError
from .format.flm import VocabEntry
from .tokenizer import Tokenizer


def _merges(vocab: dict[str, int], scores: dict[str, float], special: set[str]) -> list[tuple[str, str]]:
    ranked = []
    for piece, score in scores.items():
        if piece in special or len(piece) < 2:
            continue
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((score, pair) for pair in local)
    ranked.sort(key=lambda item: item[0], reverse=True)  # stable: ties keep the local order
    return [pair for _, pair in ranked]


def tokenizer_from_vocab(entries: list[VocabEntry], special_tokens: list[str], kv: dict[str, str]) -> Tokenizer:
    """A `tokenizers` BPE equivalent to a .flm vocab+scores table and its tokenizer_* keys."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    vocab: dict[str, int] = {}
    scores: dict[str, float] = {}
    for entry in entries:
        try:
            piece = entry.piece.decode("utf-8")
        except UnicodeDecodeError:
            raise TemplateError(f"vocab entry for token {entry.token_id} is not valid UTF-8 ({entry.piece[:16]!r}); "
                                "the file's tokenizer cannot be rebuilt") from None
        vocab[piece] = entry.token_id
        scores[piece] = entry.score
    special = set(special_tokens)
    byte_level = bool(parse_scalar(kv.get("tokenizer_byte_as_char", "False")))
    dummy_prefix = bool(parse_scalar(kv.get("tokenizer_add_dummy_prefix", "True")))
    collapse_spaces = bool(parse_scalar(kv.get("tokenizer_remove_extra_whitespaces", "False")))
    has_byte_tokens = "<0x00>" in vocab
    bpe = BPE(vocab=vocab, merges=_merges(vocab, scores, special), byte_fallback=has_byte_tokens and not byte_level,
              fuse_unk=not byte_level, unk_token="<unk>" if "<unk>" in vocab else None)
    tok = HFTokenizer(bpe)
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    else:
        steps = [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")] if collapse_spaces else []
        steps += [normalizers.Prepend("\u2581")] if dummy_prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(Regex(" "), "\u2581")])
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if dummy_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
    if special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(special) if t in vocab])
    return Tokenizer(tok.to_str(), vocab_size=max(vocab.values(), default=-1) + 1,
                     nfkc=bool(parse_scalar(kv.get("tokenizer_nfkc", "False"))))
