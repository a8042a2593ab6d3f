"""A checkpoint's tokenizer files, wherever they came from (a folder, an in-memory tokenizer, a
GGUF vocabulary), and the fastllm vocabulary table they make."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .tokenizer import (
    FastllmVocab,
    fastllm_vocab_from_sentencepiece,
    fastllm_vocab_from_tokenizer_json,
    load_tokenizer_json,
)


@dataclass
class TokenizerFiles:
    """The tokenizer parts of a model, wherever they came from."""

    tokenizer_json: str | None = None
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    sentencepiece_model: str | None = None

    @classmethod
    def from_dir(cls, directory: Path) -> "TokenizerFiles":
        files = cls()
        if (directory / "tokenizer.json").exists():
            files.tokenizer_json = (directory / "tokenizer.json").read_text(encoding="utf-8")
        if (directory / "tokenizer_config.json").exists():
            try:
                files.tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{directory / 'tokenizer_config.json'}: not valid JSON ({exc})") from None
        template = files.tokenizer_config.get("chat_template")
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        files.chat_template = template if isinstance(template, str) else None
        if (directory / "tokenizer.model").exists():
            files.sentencepiece_model = str(directory / "tokenizer.model")
        return files

    def fastllm_vocab(self) -> FastllmVocab | None:
        if self.tokenizer_json is not None:
            return fastllm_vocab_from_tokenizer_json(load_tokenizer_json(self.tokenizer_json))
        if self.sentencepiece_model is not None:
            return fastllm_vocab_from_sentencepiece(self.sentencepiece_model)
        return None
