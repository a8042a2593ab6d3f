"""Streaming conversion: any TensorSource (checkpoint folder or in-memory model) -> .flm.

One tensor is read, converted or quantized in row blocks, written, and dropped before the
next, so peak memory is about the largest tensor, not the model (fastllm's torch2flm needs
about 4 x parameters + 1 GB because it loads the whole model into torch first).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import __version__
from .config import ModelConfig, parse_scalar
from .errors import CheckpointError, TemplateError, UnsupportedDtypeError
from .families import find_family
from .format import keys
from .format.delta import DeltaSource
from .format.flm import FlmWriter
from .format.hf import HFCheckpoint, TensorSource
from .format.keys import (
    CHAT_TEMPLATE_KEY,
    FORMAT_KEY,
    NORMALIZED_KEY,
    TEMPLATE_KEYS,
    TEMPLATE_NAME_KEY,
    TEMPLATE_SOURCE_KEY,
    TOKENIZER_CONFIG_KEY,
    TOKENIZER_JSON_KEY,
)
from .layout import EMBEDDING, LINEAR
from .quant import QUANTIZERS, DType, choose_group_size, parse_dtype
from .templates import PRESETS, Template, guess_preset, preset
from .tokenization.files import TokenizerFiles

log = logging.getLogger("flm")



@dataclass
class ConvertOptions:
    dtype: str = "float16"
    group_size: int = 128
    quantizer: str = "fastllm"  # or "consistent" (see quant.py)
    model_type: str | None = None
    template: str | None = None
    pre_prompt: str | None = None
    user_role: str | None = None
    bot_role: str | None = None
    history_sep: str | None = None
    progress: bool = True


def choose_template(raw: dict[str, Any], options: ConvertOptions, family_default: str | None,
                    model_names: tuple[str, ...] = ()) -> tuple[str | None, Template | None, str]:
    """Prompt strings by priority: explicit options, config.json's 方案二 keys, a preset name,
    the family's default preset, a preset guessed from the model's name. Returns (name, template,
    source); (None, None, "") leaves the model's chat_template (or fastllm's default) in charge."""
    explicit = {k: getattr(options, k) for k in TEMPLATE_KEYS}
    from_config = {k: raw[k] for k in TEMPLATE_KEYS if isinstance(raw.get(k), str)}
    if options.template:
        base, name, source = preset(options.template), options.template, "explicit"
    elif any(v is not None for v in explicit.values()) or from_config:
        base, name, source = Template("", "", "", ""), "custom", "explicit"
    elif family_default:
        return family_default, preset(family_default), "family"
    else:
        guessed = guess_preset(*model_names)
        return (guessed, preset(guessed), "guess") if guessed else (None, None, "")
    values = {k: getattr(base, k) for k in TEMPLATE_KEYS}
    values.update(from_config)
    values.update({k: v for k, v in explicit.items() if v is not None})
    return name, Template(**values, system_format=base.system_format,
                          system_in_first_user=base.system_in_first_user), source


def _raw_config_kv(raw: dict[str, Any]) -> dict[str, str]:
    """config.json values as fastllm's torch2flm writes them (str() of each), nested rope dicts flattened."""
    kv = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            if key in ("rope_scaling", "rope_parameters"):
                for sub, sub_value in value.items():
                    kv[f"rope_scaling.{sub}"] = str(sub_value)
            continue
        kv[str(key)] = str(value)
    return kv


def write_model(out: str | os.PathLike, source: TensorSource, raw_config: dict[str, Any],
                generation_config: dict[str, Any], tokenizer: TokenizerFiles, options: ConvertOptions,
                model_names: tuple[str, ...] = ()) -> ModelConfig:
    """Convert one model to `out`; returns the normalized config it wrote."""
    raw = dict(raw_config)
    if options.model_type:
        raw["model_type"] = options.model_type
    dtype, group_from_name = parse_dtype(options.dtype)
    if options.quantizer not in QUANTIZERS:
        raise UnsupportedDtypeError(f"unknown quantizer {options.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
    group_size = group_from_name or options.group_size
    family = find_family(raw)
    cfg = family.config(raw, generation_config)
    names = tuple(model_names) + (str(raw.get("_name_or_path") or ""),)
    template_name, template, template_source = choose_template(raw, options, family.template_for(raw), names)
    # a preset guessed from the name or the family yields to the model's own chat_template
    chat_template = tokenizer.chat_template if template_source in ("", "guess", "family") else None
    if chat_template:
        template = None
        log.info("prompt template: the model's own chat_template")
    elif template_name:
        log.info("prompt template: %s (%s)", template_name, template_source)
    vocab = tokenizer.fastllm_vocab()
    plan = family.plan(source, cfg)  # checks every shape before anything is written

    kv = _raw_config_kv(raw)
    for key in list(kv):
        if key.startswith("rope_scaling.") and cfg.rope_scaling.kind == "default":
            del kv[key]  # normalized away (e.g. 5.x rope_parameters of type default)
    kv.update(cfg.fastllm_kv())
    if vocab is not None:
        kv.update(vocab.kv)
    if keys.ADD_DUMMY_PREFIX in raw:  # the cookbook's override wins over detection
        kv[keys.ADD_DUMMY_PREFIX] = str(bool(parse_scalar(raw[keys.ADD_DUMMY_PREFIX])))
    if template is not None:
        kv.update({k: getattr(template, k) for k in TEMPLATE_KEYS})
        kv[TEMPLATE_NAME_KEY] = template_name
        kv[TEMPLATE_SOURCE_KEY] = template_source
    kv[NORMALIZED_KEY] = cfg.to_json()
    kv[FORMAT_KEY] = f"written by flm {__version__}; fastllm .flm version 2 layout; flm.* keys are extras fastllm ignores"
    if tokenizer.tokenizer_json is not None:
        kv[TOKENIZER_JSON_KEY] = tokenizer.tokenizer_json
    if tokenizer.tokenizer_config:
        kv[TOKENIZER_CONFIG_KEY] = json.dumps(
            {k: v for k, v in tokenizer.tokenizer_config.items() if k not in ("chat_template", "added_tokens_decoder")},
            default=str)
    if chat_template:
        kv[CHAT_TEMPLATE_KEY] = chat_template
    if vocab is not None and vocab.entries:
        kv[keys.USE_SCORE] = "1"
    if vocab is not None and vocab.special_tokens:
        kv[keys.HAS_SPECIAL_TOKENS] = "1"
    kv = dict(sorted(kv.items()))

    fallback_logged = set()
    with FlmWriter(out) as writer:
        writer.write_header(kv, vocab.entries if vocab else [], vocab.special_tokens if vocab else [])
        writer.begin_tensors(len(plan))
        bar = tqdm(plan, desc=f"convert -> {Path(out).name}", unit="tensor", disable=not options.progress)
        for item in bar:
            tensor = item.read()
            target = dtype if item.kind == LINEAR else DType.FLOAT32
            group = group_size
            if target == DType.INT4_GROUP:
                group = choose_group_size(item.shape[1], group_size)
                if group != group_size and (item.shape[1], group) not in fallback_logged:
                    fallback_logged.add((item.shape[1], group))
                    log.warning("int4g: group size %d does not divide row length %d; using %d", group_size, item.shape[1], group)
            if item.kind == EMBEDDING:
                target = DType.FLOAT32
            writer.write_tensor(item.name, tensor, target, group, options.quantizer)
            del tensor
    return cfg


def _convert_gguf(path: Path, out: str | os.PathLike, options: ConvertOptions) -> ModelConfig:
    """A GGUF file -> .flm, tensor by tensor (format/gguf.py)."""
    from .format.gguf import GGUFFile
    from .tokenization.from_gguf import gguf_tokenizer_files

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is a file but not a GGUF model; flm converts a Hugging Face model "
                                  "folder or a .gguf file")
    gguf = GGUFFile(path)
    return write_model(out, gguf, gguf.config, {}, gguf_tokenizer_files(gguf), options, model_names=(path.stem,))


def convert(model_dir: str | os.PathLike, out: str | os.PathLike, options: ConvertOptions | None = None,
            delta_base: str | os.PathLike | None = None) -> ModelConfig:
    """`flm convert`: a Hugging Face model folder (or a llama GGUF file) -> .flm; with `delta_base`,
    `model_dir` holds a published delta that is added to the base checkpoint's weights while streaming."""
    options = options or ConvertOptions()
    if options.template and options.template not in PRESETS:
        raise TemplateError(f"unknown template {options.template!r}; `flm templates` lists: {', '.join(sorted(PRESETS))}")
    if Path(model_dir).is_file() and delta_base is None:
        return _convert_gguf(Path(model_dir), out, options)
    ckpt = HFCheckpoint(model_dir)
    tokenizer = TokenizerFiles.from_dir(ckpt.dir)
    if tokenizer.tokenizer_json is None and tokenizer.sentencepiece_model is None:
        log.warning("%s has no tokenizer.json or tokenizer.model: the .flm will have no tokenizer", ckpt.dir)
    source: TensorSource = ckpt
    if delta_base is not None:
        base = HFCheckpoint(delta_base)
        base_vocab = int(base.config.get("vocab_size") or 0)
        if base_vocab > int(ckpt.config.get("vocab_size") or 0):
            raise CheckpointError(f"the delta's vocab_size {ckpt.config.get('vocab_size')} is smaller than the "
                                  f"base's {base_vocab}: is {delta_base} the right base?")
        source = DeltaSource(base, ckpt)
    return write_model(out, source, ckpt.config, ckpt.generation_config, tokenizer, options,
                       model_names=(ckpt.dir.resolve().name,))
