"""Encode speed on the > 2 MB test corpus: flm's tokenizer (from tokenizer.json, and rebuilt from
fastllm's vocab+scores) next to Hugging Face `tokenizers`, in MB/s, one thread, line by line.

    python bench/tokenizer_speed.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus import corpus_lines  # noqa: E402
from tokenizer_fixtures import ALL, tokenizer_dir  # noqa: E402

from flm.tokenization.tokenizer import Tokenizer, fastllm_vocab_from_tokenizer_json, load_tokenizer_json  # noqa: E402
from flm.tokenization.from_vocab import tokenizer_from_vocab  # noqa: E402


def rate(encode, lines: list[str]) -> float:
    size = sum(len(line.encode()) for line in lines) / 1e6
    start = time.perf_counter()
    for line in lines:
        encode(line)
    return size / (time.perf_counter() - start)


def main() -> None:
    from tokenizers import Tokenizer as HF

    lines = corpus_lines()
    print(f"corpus: {sum(len(x.encode()) for x in lines) / 1e6:.2f} MB, {len(lines)} lines")
    print(f"{'tokenizer':<12} {'tokenizers MB/s':>16} {'flm MB/s':>9} {'flm (vocab rebuild) MB/s':>25}")
    for name in ALL:
        text = (tokenizer_dir(name) / "tokenizer.json").read_text(encoding="utf-8")
        hf = HF.from_str(text)
        ours = Tokenizer(text)
        vocab = fastllm_vocab_from_tokenizer_json(load_tokenizer_json(text))
        rebuilt = f"{rate(tokenizer_from_vocab(vocab.entries, vocab.special_tokens, vocab.kv).encode, lines):.2f}"
        print(f"{name:<12} {rate(lambda s: hf.encode(s, add_special_tokens=False), lines):>16.2f} "
              f"{rate(ours.encode, lines):>9.2f} {rebuilt:>25}")


if __name__ == "__main__":
    main()
