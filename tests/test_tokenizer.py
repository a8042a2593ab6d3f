"""Tokenizer alignment with Hugging Face `tokenizers`, on > 2 MB of real multilingual text."""

import gzip
import json
import time

import pytest

from helpers import FIXTURES
from corpus import corpus_documents, corpus_lines
from flm.errors import CheckpointError, TemplateError
from flm.format.flm import VocabEntry
from flm.tokenization.tokenizer import (StreamDecoder, Tokenizer, fastllm_vocab_from_sentencepiece, fastllm_vocab_from_tokenizer_json,
                           load_tokenizer_json)
from flm.tokenization.from_vocab import tokenizer_from_vocab
from sentencepiece_proto import encode_model, llama2_pieces
from tokenizer_fixtures import ALL, tokenizer_dir


def test_corpus_is_big_and_varied():
    docs = corpus_documents()
    text = "".join(docs)
    assert sum(len(d.encode()) for d in docs) >= 2_000_000
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # Chinese
    assert any(ord(ch) >= 0x1F300 for ch in text)  # emoji
    assert "def " in text and "    " in text and "\t" in text  # code, whitespace runs


def _hf(name):
    from tokenizers import Tokenizer as HF

    return HF.from_file(str(tokenizer_dir(name) / "tokenizer.json"))


def _mismatches(ours, reference, lines):
    theirs = [e.ids for e in reference.encode_batch(lines, add_special_tokens=False)]
    mine = ours.encode_batch(lines)
    return [(line, a, b) for line, a, b in zip(lines, theirs, mine) if a != b]


@pytest.mark.parametrize("name", ALL)
def test_ids_equal_tokenizers_from_tokenizer_json(name):
    path = tokenizer_dir(name) / "tokenizer.json"
    ours = Tokenizer(path.read_text(encoding="utf-8"))
    bad = _mismatches(ours, _hf(name), corpus_lines() + list(corpus_documents()[:20]))
    assert not bad, bad[:3]


def _rebuilt(data):
    """What flm makes of the vocab+scores table fastllm's torch2flm writes for this tokenizer."""
    vocab = fastllm_vocab_from_tokenizer_json(data)
    return tokenizer_from_vocab(vocab.entries, vocab.special_tokens, vocab.kv)


@pytest.mark.parametrize("name", ALL)
def test_ids_equal_tokenizers_from_fastllm_vocab_alone(name):
    """The rebuild for .flm files that carry only fastllm's vocab+scores table: SentencePiece
    vocabularies and byte-level ones, whose family split (Llama-3, Qwen, DeepSeek) is recognised."""
    ours = _rebuilt(load_tokenizer_json((tokenizer_dir(name) / "tokenizer.json").read_text(encoding="utf-8")))
    bad = _mismatches(ours, _hf(name), corpus_lines() + list(corpus_documents()[:20]))
    assert not bad, bad[:3]


@pytest.mark.parametrize("name", ["deepseek-coder", "deepseek-llm"])
def test_deepseek_v1_vocab_alone_gives_hugging_face_ids(name):
    """DeepSeek Coder / LLM vocabularies (no tokenizer.json here) against Hugging Face's ids for
    llama.cpp's tokenizer test strings (see fixtures/tokenizers/ggml_vocab/SOURCE.md): whitespace
    runs, digits, CJK, code, and the bytes DeepSeek added as tokens ("ü" in "für")."""
    with gzip.open(FIXTURES / "tokenizers" / "ggml_vocab" / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        fixture = json.load(f)
    tokens, types = fixture["tokens"], fixture["types"]
    data = {"model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": fixture["merges"]},
            "added_tokens": [{"content": t, "id": i, "special": kind == 3}
                             for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)],
            "decoder": {"type": "ByteLevel"}}
    ours = _rebuilt(data)
    assert len(fixture["tests"]) >= 40
    got = [(text, ids, ours.encode(text)) for text, ids in fixture["tests"]]
    bad = [case for case in got if case[1] != case[2]]
    assert not bad, bad[:3]


@pytest.mark.parametrize("name", ["llama3", "qwen3", "deepseek_v3", "smollm2"])
def test_added_tokens_match_in_text_without_fastllm_special_list(name):
    """torch2flm writes its special-token list only in some cases; the added tokens are still known
    by their score (no merge makes them) and match in raw text as in Hugging Face."""
    data = load_tokenizer_json((tokenizer_dir(name) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = fastllm_vocab_from_tokenizer_json(data)
    ours = tokenizer_from_vocab(vocab.entries, [], vocab.kv)
    texts = ["<|eot_id|>hi<|start_header_id|>", "<|im_start|>user\nf\u00fcr<|im_end|>",
             "<\uff5cbegin\u2581of\u2581sentence\uff5c>x<\uff5cend\u2581of\u2581sentence\uff5c>"]
    assert _mismatches(ours, _hf(name), texts) == []


@pytest.mark.parametrize("dummy_prefix,collapse", [(True, False), (False, False), (False, True)])
def test_sentencepiece_model_alone_gives_sentencepiece_ids(tmp_path, dummy_prefix, collapse):
    """Checkpoints that ship only tokenizer.model (InternLM2, Yi, Baichuan): the vocab and
    normalizer switches read from the model, rebuilt, against the sentencepiece library itself.
    Lines holding <s>, </s> or <unk> are left out: sentencepiece reads them as text, transformers'
    tokenizers (and flm) as the special tokens."""
    import sentencepiece

    blob = encode_model(llama2_pieces(), add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=collapse)
    (tmp_path / "tokenizer.model").write_bytes(blob)
    vocab = fastllm_vocab_from_sentencepiece(str(tmp_path / "tokenizer.model"))
    assert {"<unk>", "<s>", "</s>"} <= set(vocab.special_tokens)
    ours = tokenizer_from_vocab(vocab.entries, vocab.special_tokens, vocab.kv)
    lines = [line for line in corpus_lines() if not any(t in line for t in ("<s>", "</s>", "<unk>"))]
    lines += ["  a    b  ", " x\t  y \n  z  ", "   "]
    theirs = sentencepiece.SentencePieceProcessor(model_proto=blob).encode(lines)
    bad = [(line, a, b) for line, a, b in zip(lines, theirs, ours.encode_batch(lines)) if a != b]
    assert not bad, bad[:3]


def test_sentencepiece_model_errors(tmp_path):
    path = tmp_path / "tokenizer.model"
    blob = encode_model(llama2_pieces()[:300])
    for broken in (blob[:-7], b"\x0a\xff\xff\xff\xff\x0f", b"not a model"):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError, match="SentencePiece"):
            fastllm_vocab_from_sentencepiece(str(path))
    path.write_bytes(encode_model(llama2_pieces()[:300], model_type=1))
    with pytest.raises(TemplateError, match="unigram"):
        fastllm_vocab_from_sentencepiece(str(path))
    with pytest.raises(CheckpointError, match="cannot read"):
        fastllm_vocab_from_sentencepiece(str(tmp_path / "missing.model"))


def test_special_tokens_in_text_and_fix_tokens():
    ours = Tokenizer((tokenizer_dir("llama2") / "tokenizer.json").read_text())
    assert ours.encode("<s>hi</s>") == [1, 7251, 2]
    assert ours.encode_prompt("<FLM_FIX_TOKEN_1>hi<FLM_FIX_TOKEN_2>") == [1, 7251, 2]


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_hostile_text_encodes_as_tokenizers_does(name):
    """Control characters, emoji sequences, mixed scripts and whitespace runs: Hugging Face's ids,
    and the text back from them. A lone surrogate, which UTF-8 cannot hold (`tokenizers` raises),
    becomes U+FFFD, as transformers' slow tokenizers make it."""
    ours, theirs = Tokenizer((tokenizer_dir(name) / "tokenizer.json").read_text()), _hf(name)
    for text in ("\x00\x01\x7f control", "🙂👍🏽👨‍👩‍👧", "中文混合 English ١٢٣ עברית", "\t\t  \n\n   "):
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)
    with pytest.raises(TypeError):
        theirs.encode("lone \ud800 surrogate")
    assert ours.encode("lone \ud800 surrogate") == theirs.encode("lone \ufffd surrogate", add_special_tokens=False).ids


def test_encoding_time_is_linear():
    """16 times the text may take at most 40 times as long (linear: 16; quadratic: 256); each
    size's best of three, the smallest already long enough (~25k characters) to time."""
    ours = Tokenizer((tokenizer_dir("llama2") / "tokenizer.json").read_text())
    unit = "The quick brown fox 跳过 lazy dogs 🙂. " * 10
    timings = []
    for repeat in (64, 1024):
        text = unit * repeat
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            ours.encode(text)
            best = min(best, time.perf_counter() - start)
        timings.append(best)
    assert len(unit * 64) >= 20_000
    assert timings[1] < timings[0] * 40, timings


def test_stream_decoder_never_splits_characters():
    ours = Tokenizer((tokenizer_dir("llama2") / "tokenizer.json").read_text())
    text = "你好, 世界 🙂 ok"
    ids = ours.encode(text)
    decoder = StreamDecoder(ours)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == ours.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_token_bytes():
    ours = Tokenizer((tokenizer_dir("llama2") / "tokenizer.json").read_text())
    assert ours.token_bytes(ours.token_to_id("<0xE4>")) == b"\xe4"
    assert ours.token_bytes(ours.token_to_id("\u2581the")) == b" the"
    smol = Tokenizer((tokenizer_dir("smollm2") / "tokenizer.json").read_text())
    assert smol.token_bytes(smol.token_to_id("\u0120world")) == b" world"


@pytest.mark.parametrize("name", ["llama3", "qwen3", "deepseek_v3", "smollm2"])
def test_token_bytes_equal_hugging_face_decode_of_one_token(name):
    """tokenizer_decode_token's bytes for byte-level vocabularies, added tokens included
    (DeepSeek's are outside the byte alphabet), wherever one token decodes to whole characters."""
    ours = Tokenizer((tokenizer_dir(name) / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(range(0, ours.vocab_size, 97)) + list(ours._tok.get_added_tokens_decoder())
    reference = _hf(name)
    texts = {i: reference.decode([i], skip_special_tokens=False) for i in ids}
    bad = [(i, t) for i, t in texts.items() if "\ufffd" not in t and ours.token_bytes(i) != t.encode()]
    assert not bad, bad[:3]


def test_nfkc_option():
    plain = Tokenizer((tokenizer_dir("llama2") / "tokenizer.json").read_text())
    nfkc = Tokenizer((tokenizer_dir("llama2") / "tokenizer.json").read_text(), nfkc=True)
    assert nfkc.encode("ｆｕｌｌｗｉｄｔｈ") == plain.encode("fullwidth") != plain.encode("ｆｕｌｌｗｉｄｔｈ")


def test_remove_extra_whitespaces_option():
    vocab = fastllm_vocab_from_tokenizer_json(load_tokenizer_json((tokenizer_dir("llama2") / "tokenizer.json").read_text()))
    collapsing = tokenizer_from_vocab(vocab.entries, vocab.special_tokens, {**vocab.kv, "tokenizer_remove_extra_whitespaces": "True"})
    plain = tokenizer_from_vocab(vocab.entries, vocab.special_tokens, vocab.kv)
    assert collapsing.encode("  a    b  ") == plain.encode("a b")


def test_invalid_utf8_vocab_is_a_clear_error():
    with pytest.raises(TemplateError, match="token 1 is not valid UTF-8"):
        tokenizer_from_vocab([VocabEntry(b"a", 0, 0.0), VocabEntry(b"\xff\xfe", 1, 0.0)], [], {})


def test_bad_tokenizer_json():
    with pytest.raises(TemplateError, match="not valid JSON"):
        load_tokenizer_json("{nope")
    with pytest.raises(TemplateError, match="cannot be loaded"):
        Tokenizer(json.dumps({"model": {"type": "Nope"}}))
