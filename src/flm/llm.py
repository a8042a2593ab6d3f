"""fastllm's Python API (`fastllm_pytools.llm`): model(path), from_hf(...), response, chat, ...

Names, defaults and semantics follow fastllm: `max_length` counts new tokens, `top_k=1`
(the default) means greedy, `tokenizer_encode_string` adds no BOS, prompts are
pre_prompt + rounds of user_role + query + bot_role (+ answer + history_sep).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterator

import torch

from .backends import choose_backend
from .config import DEFAULT_KV_CACHE_DTYPE, ModelConfig, parse_scalar
from .errors import FlmError, FlmFormatError, TemplateError
from .families import find_family
from .format import keys
from .format.flm import FlmFile, read_flm, rewrite_flm
from .format.keys import (CHAT_TEMPLATE_KEY, LEGACY_CHAT_TEMPLATE_KEY, NORMALIZED_KEY, TEMPLATE_SOURCE_KEY,
                          TOKENIZER_CONFIG_KEY, TOKENIZER_JSON_KEY)
from .generate import SamplingConfig, generate  # noqa: F401 - SamplingConfig is public API
from .kv_cache import kv_dtype
from .loader import load_transformer
from .templates import PRESETS, Template, render_chat_template, template_from_kv
from .tokenization.from_vocab import tokenizer_from_vocab
from .tokenization.tokenizer import StreamDecoder, Tokenizer


def set_cpu_threads(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))


def get_cpu_threads() -> int:
    return torch.get_num_threads()


def _config_adopting_names(flm: FlmFile) -> ModelConfig:
    """The model config a file carries (flm's normalized one, or fastllm's raw keys); for the
    latter its tensors also get their canonical names."""
    if NORMALIZED_KEY in flm.kv:
        try:
            return ModelConfig.from_json(flm.kv[NORMALIZED_KEY])
        except (ValueError, TypeError) as exc:
            raise FlmFormatError(flm.path, f"stored flm.config is invalid: {exc}") from None
    raw: dict[str, Any] = dict(flm.kv)
    raw.setdefault("model_type", "llama")
    family = find_family(raw)
    cfg = family.config(raw)
    family.adopt_file_names(flm, cfg)  # a fastllm-written file: the checkpoint's own tensor names
    return cfg


def _prompt_sources(kv: dict[str, str]) -> tuple[str | None, Template | None]:
    """(chat template, prompt strings) a file's prompts come from, the one in charge first. As in
    fastllm, a `chat_template` key wins over the prompt strings; without one the strings apply
    (None: fastllm's default). Files flm wrote before 2026-12-08 kept the template under
    `flm.chat_template`, where it yielded only to strings chosen on purpose, not to a preset
    guessed from the model's name or family."""
    stored = template_from_kv(kv)
    if kv.get(CHAT_TEMPLATE_KEY):
        return kv[CHAT_TEMPLATE_KEY], None
    legacy = kv.get(LEGACY_CHAT_TEMPLATE_KEY)
    if legacy and (stored is None or kv.get(TEMPLATE_SOURCE_KEY) in ("guess", "family")):
        return legacy, None
    return None, stored


def _checked_device(device: str | torch.device | None) -> str:
    """'cpu' or a CUDA device torch can use, else a typed error saying what to pass."""
    try:
        parsed = torch.device(device or "cpu")
    except RuntimeError:
        raise FlmError(f"unknown device {str(device)!r}; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if parsed.type not in ("cpu", "cuda"):
        raise FlmError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda' (or 'cuda:N')")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise FlmError(f"device={str(device)!r} was asked for but torch sees no CUDA GPU; use device='cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise FlmError(f"device={str(device)!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return str(parsed)


class model:  # noqa: N801 - fastllm's class name
    """A loaded .flm model."""

    def __init__(self, path: str | os.PathLike, id: int = -1, lora: str | None = None,  # noqa: A002
                 reference: bool = False, device: str | None = None, max_context_length: int | None = None,
                 kv_cache_dtype: str = DEFAULT_KV_CACHE_DTYPE):
        """`max_context_length`: the context window in tokens (prompt and answer together; default:
        what the model's RoPE serves, its trained window or more where a scaling extends it).
        `kv_cache_dtype`: what the KV cache stores, float32, float16 (the default: half the
        memory, SmolLM2's greedy answers unchanged), bfloat16 or int8 (a scale per head row)."""
        if lora is not None:
            raise NotImplementedError("LoRA adapters in .flm files are not supported by flm yet")
        device = _checked_device(device)
        self._flm = read_flm(path)
        self.config = _config_adopting_names(self._flm)
        self.model = load_transformer(self._flm, self.config, reference=reference, device=device)
        self.backend = choose_backend(self.model, max_context_length, kv_dtype(kv_cache_dtype))
        kv = self._flm.kv
        self.model_type = self.config.model_type
        self.direct_query = False
        if TOKENIZER_JSON_KEY in kv:
            self.tokenizer = Tokenizer(kv[TOKENIZER_JSON_KEY], nfkc=bool(parse_scalar(kv.get(keys.NFKC, "False"))))
        elif self._flm.vocab:
            self.tokenizer = tokenizer_from_vocab(self._flm.vocab, self._flm.special_tokens, kv)
        else:
            raise FlmFormatError(self._flm.path, "the file carries no tokenizer")
        self.tokenizer_config: dict[str, Any] = json.loads(kv.get(TOKENIZER_CONFIG_KEY, "{}"))
        self.chat_template, stored = _prompt_sources(kv)
        self.template: Template | None = stored or (None if self.chat_template else PRESETS["alpaca"])
        self.eos_ids = set(self.config.eos_token_ids)
        eos_text = self.tokenizer_config.get("eos_token")
        if isinstance(eos_text, str) and self.tokenizer.token_to_id(eos_text) is not None:
            self.eos_ids.add(self.tokenizer.token_to_id(eos_text))

    # ------------------------------------------------------------ prompts and tokens
    def get_prompt(self, query: str, history: list[tuple[str, str]] | None = None, system: str | None = None) -> str:
        """The exact prompt string fastllm (or the chat_template) builds for this turn."""
        history = list(history or [])
        if self.template is not None:
            return self.template.prompt(query, history, system)
        messages = [{"role": "system", "content": system}] if system else []
        for question, answer in history:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": query})
        special = {k: v for k, v in self.tokenizer_config.items() if k.endswith("_token") and isinstance(v, str)}
        return render_chat_template(self.chat_template, messages, add_generation_prompt=True, **special)

    def prompt_for_messages(self, messages: list[dict[str, str]]) -> str:
        """An OpenAI-style message list as this model's prompt (chat_template or fastllm strings)."""
        if self.template is None:
            special = {k: v for k, v in self.tokenizer_config.items() if k.endswith("_token") and isinstance(v, str)}
            return render_chat_template(self.chat_template, messages, add_generation_prompt=True, **special)
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        roles = [m["role"] for m in messages]
        if not roles or roles[-1] != "user" or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
            raise TemplateError("messages must alternate user/assistant (after an optional system message) "
                                "and end with a user message")
        history = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]
        return self.template.prompt(messages[-1]["content"], history, system)

    def tokenizer_encode_string(self, content: str) -> list[int]:
        return self.tokenizer.encode(content)

    def tokenizer_decode_token(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode_prompt(prompt)

    # ------------------------------------------------------------ generation
    def _sampling(self, max_length: int, do_sample: bool, top_p: float, top_k: int, temperature: float,
                  repeat_penalty: float, stop_token_ids: list[int] | None, seed: int | None) -> SamplingConfig:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        return SamplingConfig(max_length, do_sample, top_p, top_k, temperature, repeat_penalty,
                              list(stop_token_ids or []), seed)

    def generate_ids(self, input_ids: list[int], sampling: SamplingConfig) -> Iterator[int]:
        return generate(self.backend, input_ids, sampling, self.eos_ids)

    def stream_response(self, query: str, history: list[tuple[str, str]] | None = None, max_length: int = 8192,
                        do_sample: bool = True, top_p: float = 0.8, top_k: int = 1, temperature: float = 1.0,
                        repeat_penalty: float = 1.0, one_by_one: bool = True, stop_token_ids: list[int] | None = None,
                        seed: int | None = None) -> Iterator[str]:
        """Text pieces as they are generated (whole characters only)."""
        prompt = query if self.direct_query else self.get_prompt(query, history)
        sampling = self._sampling(max_length, do_sample, top_p, top_k, temperature, repeat_penalty, stop_token_ids, seed)
        decoder = StreamDecoder(self.tokenizer)
        text = ""
        for token in self.generate_ids(self.encode_prompt(prompt), sampling):
            piece = decoder.push(token)
            if piece:
                text += piece
                yield piece if one_by_one else text

    def response(self, query: str, history: list[tuple[str, str]] | None = None, max_length: int = 8192,
                 do_sample: bool = True, top_p: float = 0.8, top_k: int = 1, temperature: float = 1.0,
                 repeat_penalty: float = 1.0, stop_token_ids: list[int] | None = None, seed: int | None = None) -> str:
        return "".join(self.stream_response(query, history, max_length, do_sample, top_p, top_k, temperature,
                                            repeat_penalty, True, stop_token_ids, seed))

    def stream_response_raw(self, input_tokens: list[int], max_length: int = 8192, do_sample: bool = True,
                            top_p: float = 0.8, top_k: int = 1, temperature: float = 1.0, repeat_penalty: float = 1.0,
                            one_by_one: bool = True, stop_token_ids: list[int] | None = None) -> Iterator[bytes]:
        """Bytes of each generated token (fastllm leaves UTF-8 assembly to the caller)."""
        sampling = self._sampling(max_length, do_sample, top_p, top_k, temperature, repeat_penalty, stop_token_ids, None)
        total = b""
        for token in self.generate_ids(list(input_tokens), sampling):
            piece = self.tokenizer_decode_token(token)
            total += piece
            yield piece if one_by_one else total

    def response_logits(self, query: str, history: list[tuple[str, str]] | None = None, tokenizer: Any = None) -> list[float]:
        """Next-token logits after the prompt (float32, one per vocab entry)."""
        prompt = query if self.direct_query else self.get_prompt(query, history)
        ids = tokenizer.encode(prompt) if tokenizer is not None else self.encode_prompt(prompt)
        return self.backend.prefill(ids, self.backend.new_cache(len(ids), initial=len(ids))).tolist()

    def chat(self, tokenizer: Any, query: str, history: list[tuple[str, str]] | None = None, max_length: int = 8192,
             do_sample: bool = True, top_p: float = 0.8, top_k: int = 1, temperature: float = 1.0,
             repeat_penalty: float = 1.0, **kwargs: Any) -> tuple[str, list[tuple[str, str]]]:
        """ChatGLM-style: encode with the caller's tokenizer, return (response, new history)."""
        response = ""
        history = list(history or [])
        for response, new_history in self.stream_chat(tokenizer, query, history, max_length=max_length,
                                                      do_sample=do_sample, top_p=top_p, top_k=top_k,
                                                      temperature=temperature, repeat_penalty=repeat_penalty):
            pass
        return response, history + [(query, response)]

    def stream_chat(self, tokenizer: Any, query: str, history: list[tuple[str, str]] | None = None,
                    past_key_values: Any = None, max_length: int = 8192, do_sample: bool = True, top_p: float = 0.8,
                    top_k: int = 1, temperature: float = 1.0, repeat_penalty: float = 1.0,
                    return_past_key_values: bool = False, **kwargs: Any) -> Iterator[tuple]:
        history = list(history or [])
        prompt = query if self.direct_query else self.get_prompt(query, history)
        sampling = self._sampling(max_length, do_sample, top_p, top_k, temperature, repeat_penalty, None, None)
        tokens: list[int] = []
        for token in self.generate_ids(list(tokenizer.encode(prompt)), sampling):
            tokens.append(token)
            response = tokenizer.decode(tokens)
            new_history = history + [(query, response)]
            yield (response, new_history, None) if return_past_key_values else (response, new_history)

    def set_max_context_length(self, length: int) -> None:
        """The context window from now on (fastllm's name); sequences already running keep theirs."""
        if length < 1:
            raise ValueError(f"the context window must be at least 1 token, got {length}")
        self.backend.window = int(length)

    def set_kv_cache_dtype(self, kv_cache_dtype: str) -> None:
        """What KV caches made from now on store (fastllm's name); running sequences keep theirs."""
        self.backend.kv_dtype = kv_dtype(kv_cache_dtype)

    def set_chunked_prefill_size(self, size: int) -> None:
        """Prompt tokens per forward pass (fastllm's name; the server steps other sequences
        between two chunks)."""
        if size < 1:
            raise ValueError(f"a prefill chunk holds at least 1 token, got {size}")
        self.backend.prefill_chunk = int(size)

    def get_max_input_len(self) -> int:
        """The longest prompt that leaves room for one new token (fastllm's name)."""
        return self.backend.window - 1

    # ------------------------------------------------------------ misc
    def save(self, path: str | os.PathLike) -> None:
        """Write the model back out as a .flm (tensors copied as stored, no requantization)."""
        rewrite_flm(self._flm, path)

    def eval(self) -> "model":
        return self


def from_hf(model: Any, tokenizer: Any = None, pre_prompt: str | None = None, user_role: str | None = None,
            bot_role: str | None = None, history_sep: str | None = None, dtype: str = "float16",
            device: str | None = None, **kwargs: Any) -> "model":
    """The cookbook's two-line acceleration: a transformers model -> an flm model in memory.

    The weights are streamed into a temporary .flm that is memory-mapped and unlinked at once,
    so nothing is left on disk and the same loader serves files and live models. `device` as in
    `model(path, device=...)`.
    """
    from .torch2flm import tofile

    fd, path = tempfile.mkstemp(suffix=".flm")
    os.close(fd)
    try:
        tofile(path, model, tokenizer, pre_prompt=pre_prompt, user_role=user_role, bot_role=bot_role,
               history_sep=history_sep, dtype=dtype, progress=kwargs.pop("progress", False), **kwargs)
        return globals()["model"](path, device=device)
    finally:
        if os.path.exists(path):
            os.unlink(path)


__all__ = ["SamplingConfig", "from_hf", "get_cpu_threads", "model", "set_cpu_threads"]
