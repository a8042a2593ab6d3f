"""fastllm's `torch2flm.tofile` for an in-memory transformers model and tokenizer (方案一).

Works with transformers 4.x and 5.x: the config is read from `config.to_dict()` merged with
`config.__dict__`, so the cookbook's `conf = model.config.__dict__; conf["model_type"] = "llama"`
overrides apply, and the tokenizer is taken from the object itself (its backend tokenizer.json),
not from files on disk.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .convert import ConvertOptions, write_model
from .format.hf import StateDictSource
from .tokenization.files import TokenizerFiles


def model_config_dict(model: Any) -> dict[str, Any]:
    """config.to_dict() (every key, any transformers version) with instance overrides on top."""
    config = model.config
    raw = dict(config.to_dict()) if hasattr(config, "to_dict") else {}
    for key, value in vars(config).items():
        if not key.startswith("_"):
            raw[key] = value
    raw.setdefault("model_type", getattr(config, "model_type", None))
    return raw


def generation_config_dict(model: Any) -> dict[str, Any]:
    generation = getattr(model, "generation_config", None)
    if generation is None:
        return {}
    return generation.to_dict() if hasattr(generation, "to_dict") else dict(vars(generation))


def tokenizer_files(tokenizer: Any) -> TokenizerFiles:
    """tokenizer.json, tokenizer_config and chat_template of a transformers tokenizer object."""
    files = TokenizerFiles()
    if tokenizer is None:
        return files
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        files.tokenizer_json = backend.to_str()
    elif getattr(tokenizer, "vocab_file", None) and str(tokenizer.vocab_file).endswith(".model"):
        files.sentencepiece_model = str(tokenizer.vocab_file)
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, key, None)
        if isinstance(value, str):
            files.tokenizer_config[key] = value
    for key in ("add_bos_token", "add_eos_token"):
        if hasattr(tokenizer, key):
            files.tokenizer_config[key] = getattr(tokenizer, key)
    template = getattr(tokenizer, "chat_template", None)
    files.chat_template = template if isinstance(template, str) else None
    return files


def tofile(exportPath: str | os.PathLike, model: Any, tokenizer: Any = None, pre_prompt: str | None = None,
           user_role: str | None = None, bot_role: str | None = None, history_sep: str | None = None,
           dtype: str = "float16", eos_id: int | None = None, group_size: int = 128, template: str | None = None,
           progress: bool = True) -> None:
    """Write `model` (a transformers causal LM) and `tokenizer` to a .flm file."""
    raw = model_config_dict(model)
    generation = generation_config_dict(model)
    if eos_id is not None:
        generation["eos_token_id"] = eos_id
    options = ConvertOptions(dtype=dtype, group_size=group_size, template=template, pre_prompt=pre_prompt,
                             user_role=user_role, bot_role=bot_role, history_sep=history_sep, progress=progress)
    state = model.state_dict()
    write_model(exportPath, StateDictSource(state), json.loads(json.dumps(raw, default=str)), generation,
                tokenizer_files(tokenizer), options)
