"""How byte-level BPE families split text before merging, for vocabularies that arrive without
their tokenizer.json.

fastllm's torch2flm keeps a byte-level tokenizer's pieces, ids and merge ranks but not its
pre-tokenizer, and the split decides the ids as much as the merges do: Llama-3 groups digits in
threes, Qwen keeps each digit alone, DeepSeek splits letters, punctuation and CJK apart. GPT-2's
split (a plain `ByteLevel` pre-tokenizer) gave other ids than Hugging Face's on two lines in three
of a multilingual corpus for these vocabularies. A vocabulary is recognised by a token its family
keeps at a fixed id; the patterns are the families' own tokenizer.json pre-tokenizers (DeepSeek
v1's as llama.cpp's llama-vocab.cpp spells them, checked against Hugging Face's ids by the tests).
Unknown vocabularies keep GPT-2's split. Llama-3 also skips merging for a pre-token that is already
a piece (its tokenizer.json's `ignore_merges`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_RUNS = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CJK_V1 = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_BOS_V1 = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"


@dataclass(frozen=True)
class ByteLevelSplit:
    """One family's split: regexes applied in order (each piece isolated), then bytes to chars."""

    name: str
    marker: tuple[str, int]  # (token, id) that only this family's vocabulary has
    patterns: tuple[str, ...]
    nfc: bool = False
    ignore_merges: bool = False  # a pre-token that is a whole vocab piece stays one token (Llama-3)

    def configure(self, tok: Any) -> None:
        """Give a `tokenizers` byte-level BPE this family's split, normalizer and decoder."""
        from tokenizers import Regex, decoders, normalizers, pre_tokenizers

        if self.patterns:
            splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in self.patterns]
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if self.nfc:
            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()


GPT2 = ByteLevelSplit("gpt2", ("", -1), ())

FAMILIES = (
    ByteLevelSplit("llama3", ("<|begin_of_text|>", 128000), (_CONTRACTIONS + r"\p{N}{1,3}|" + _RUNS,),
                   ignore_merges=True),
    ByteLevelSplit("qwen2", ("<|endoftext|>", 151643), (_CONTRACTIONS + r"\p{N}|" + _RUNS,), nfc=True),
    ByteLevelSplit("deepseek-v3", (_BOS_V1, 0), (
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    )),
    ByteLevelSplit("deepseek-coder", (_BOS_V1, 32013), ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_V1, r"\p{N}")),
    ByteLevelSplit("deepseek-llm", (_BOS_V1, 100000), (
        "[\r\n]",
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
        "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
        "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
        "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
        "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
        "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
        "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
        "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
        "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        "\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+$",
        _CJK_V1,
        r"\p{N}+",
    )),
)


def split_named(name: str) -> ByteLevelSplit:
    """A family's split by name (GGUF files name theirs), GPT-2's for any other name."""
    return next((family for family in FAMILIES if family.name == name), GPT2)


def byte_level_split(vocab: dict[str, int]) -> ByteLevelSplit:
    """The split of the family whose marker token sits at its id in `vocab`, else GPT-2's."""
    for family in FAMILIES:
        token, token_id = family.marker
        if vocab.get(token) == token_id:
            return family
    return GPT2
