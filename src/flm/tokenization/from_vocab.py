"""Rebuild a tokenizer from fastllm's vocab+scores, for .flm files without a stored tokenizer.json
(files written by fastllm's own torch2flm).

Merges are derived from the scores the way transformers converts a SentencePiece model
(`SentencePieceExtractor`): every split of a piece into two vocab pieces is a merge, ranked by
the piece's score. fastllm stores SentencePiece scores (slow tokenizers) or -merge_rank (fast
ones); both rank merges correctly. In a byte-level vocabulary the score also tells merged pieces
(0, -1, ...) from the rest (1.0): single bytes, and tokens the tokenizer had added, which
Hugging Face matches in the raw text before any split (e.g. DeepSeek's "ü", Llama-3's
"<|eot_id|>"). The split itself is the family's (`byte_level_splits`).
"""

from __future__ import annotations

from ..config import parse_scalar
from ..errors import TemplateError
from ..format import keys
from ..format.flm import VocabEntry
from .byte_level_splits import byte_level_split
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


def _added_byte_level(vocab: dict[str, int], scores: dict[str, float]) -> set[str]:
    """Pieces no merge makes: longer than one character, or numbered after every merged piece."""
    merged_ids = [vocab[piece] for piece, score in scores.items() if score <= 0]
    if not merged_ids:
        return set()  # no merge ranks stored (fastllm's slow GPT-2 path): nothing to tell apart
    last = max(merged_ids)
    return {piece for piece, score in scores.items() if score > 0 and (len(piece) > 1 or vocab[piece] > last)}


def tokenizer_from_vocab(entries: list[VocabEntry], special_tokens: list[str], kv: dict[str, str]) -> Tokenizer:
    """A `tokenizers` BPE equivalent to a .flm vocab+scores table and its tokenizer_* keys."""
    from tokenizers import AddedToken, Regex, decoders, normalizers
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
    byte_level = bool(parse_scalar(kv.get(keys.BYTE_AS_CHAR, "False")))
    dummy_prefix = bool(parse_scalar(kv.get(keys.ADD_DUMMY_PREFIX, "True")))
    collapse_spaces = bool(parse_scalar(kv.get(keys.REMOVE_EXTRA_WHITESPACES, "False")))
    has_byte_tokens = "<0x00>" in vocab
    added = _added_byte_level(vocab, scores) if byte_level else set()
    ranked = {piece: score for piece, score in scores.items() if piece not in added}
    split = byte_level_split(vocab) if byte_level else None
    bpe = BPE(vocab=vocab, merges=_merges(vocab, ranked, special), byte_fallback=has_byte_tokens and not byte_level,
              fuse_unk=not byte_level, unk_token="<unk>" if "<unk>" in vocab else None,
              ignore_merges=bool(split and split.ignore_merges))
    tok = HFTokenizer(bpe)
    if split:
        split.configure(tok)
    else:
        # SentencePiece's remove_extra_whitespaces: spaces only (not tabs or newlines) trimmed and collapsed
        steps = [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")] \
            if collapse_spaces else []
        steps += [normalizers.Prepend("\u2581")] if dummy_prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(Regex(" "), "\u2581")])
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if dummy_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
    if special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(special) if t in vocab])
    if added - special:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in sorted(added - special)])
    return Tokenizer(tok.to_str(), vocab_size=max(vocab.values(), default=-1) + 1,
                     nfkc=bool(parse_scalar(kv.get(keys.NFKC, "False"))))
