"""A multilingual test corpus (> 2 MB) from text that Python and the test dependencies ship:
English prose (pydoc's topic help), Python code, CPython's Makefile (tabs), Chinese/Japanese/
Korean (CPython's cjkencodings test texts), emoji with names in a dozen scripts (`emoji`)."""

from __future__ import annotations

import sysconfig
from functools import lru_cache
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _english() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _code(limit: int) -> list[str]:
    docs, size = [], 0
    for path in sorted(STDLIB.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        size += len(text.encode())
        if size > limit:
            break
    return docs


def _makefile() -> list[str]:
    """CPython's own Makefile: tab-indented recipes and long whitespace runs."""
    found = sorted(STDLIB.glob("config-*/Makefile"))
    return [found[0].read_text(encoding="utf-8", errors="replace")] if found else []


def _cjk() -> list[str]:
    folder = STDLIB / "test" / "cjkencodings"
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*-utf8.txt"))] if folder.exists() else []


def _emoji() -> list[str]:
    import emoji

    lines = []
    for symbol, data in sorted(emoji.EMOJI_DATA.items()):
        names = " ".join(str(v) for k, v in sorted(data.items()) if isinstance(v, str))
        lines.append(f"{symbol} {names} {symbol}{symbol}")
    return ["\n".join(lines[i:i + 50]) for i in range(0, len(lines), 50)]


@lru_cache(maxsize=1)
def corpus_documents() -> tuple[str, ...]:
    docs = _english() + _cjk() + _emoji() + _makefile()
    size = sum(len(d.encode()) for d in docs)
    docs += _code(max(0, 2_100_000 - size))
    return tuple(docs)


def corpus_lines() -> list[str]:
    """Every line of every document, line ends kept (whitespace runs and indentation included)."""
    return [line for doc in corpus_documents() for line in doc.splitlines(keepends=True)]
