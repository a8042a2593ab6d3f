"""Prompt templates: fastllm's four strings, the cookbook's presets, and Jinja chat_templates.

fastllm builds a prompt as
    pre_prompt + sum(user_role + q_i + bot_role + a_i + history_sep) + user_role + q + bot_role
(LlamaModel::MakeInput/MakeHistory). A model's own `chat_template` is rendered the way
transformers' apply_chat_template does, in a sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TemplateError
from .format.keys import TEMPLATE_KEYS, TEMPLATE_NAME_KEY

_LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make any sense, "
    "or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, "
    "please don't share false information."
)


@dataclass(frozen=True)
class Template:
    pre_prompt: str
    user_role: str
    bot_role: str
    history_sep: str
    # Beyond fastllm: where a system message goes. "{system}" is replaced by its text; Llama-2
    # style models put it inside the first [INST] (system_in_first_user), others before round 0.
    system_format: str = "{system}\n"
    system_in_first_user: bool = False

    def prompt(self, query: str, history: list[tuple[str, str]] | None = None, system: str | None = None) -> str:
        """fastllm's MakeInput over MakeHistory for every finished round (plus a system message)."""
        text = self.pre_prompt
        intro = self.system_format.replace("{system}", system) if system else ""
        if not self.system_in_first_user:
            text, intro = text + intro, ""
        for question, answer in history or []:
            text += self.user_role + intro + question + self.bot_role + answer + self.history_sep
            intro = ""
        return text + self.user_role + intro + query + self.bot_role


_LLAMA2_SYS = dict(system_format="<<SYS>>\n{system}\n<</SYS>>\n\n", system_in_first_user=True)
_CHATML_SYS = dict(system_format="<|im_start|>system\n{system}<|im_end|>\n")


# The cookbook's exact strings ("LLaMA 类模型转换参考"), plus fastllm's LLaMA default (alpaca).
PRESETS: dict[str, Template] = {
    "alpaca": Template(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
        "### Instruction:\n", "\n\n### Response:", "</s>"),
    "base": Template("", "", "", ""),
    "base-bos": Template("<FLM_FIX_TOKEN_1>", "", "", ""),
    "internlm": Template("<s><s>", "<|User|>:", "<eoh>\n<|Bot|>:", "<eoa>\n<s>"),
    "xverse": Template("", "Human: ", "\n\nAssistant: ", "<FLM_FIX_TOKEN_3>"),
    "vicuna": Template(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. ",
        "USER: ", " ASSISTANT:", "<s>"),
    "billa": Template("\n", "Human: ", "\nAssistant: ", "\n"),
    "llama2-chat": Template("<FLM_FIX_TOKEN_1>", "[INST] ", " [/INST]", " <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>", **_LLAMA2_SYS),
    "llama2-chat-system": Template(
        "<FLM_FIX_TOKEN_1>[INST] <<SYS>>\n" + _LLAMA2_SYSTEM + "\n<</SYS>>\n\n",
        " ", " [/INST]", " <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>"),
    "codellama-instruct": Template("<FLM_FIX_TOKEN_1>", "[INST] ", " [/INST]", " <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>",
                                   **_LLAMA2_SYS),
    "chinese-alpaca-2": Template(
        "<FLM_FIX_TOKEN_1>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n",
        " ", " [/INST]", " <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>"),
    "yulan": Template(
        "The following is a conversation between a human and an AI assistant namely YuLan, developed by GSAI, "
        "Renmin University of China. The AI assistant gives helpful, detailed, and polite answers to the user's questions.\n",
        "[|Human|]:", "\n[|AI|]:", "\n"),
    "yi": Template("", "<|im_start|>user\n", "<|im_end|><|im_start|>assistant\n", "<|im_end|>\n", **_CHATML_SYS),
    "wizardcoder": Template(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
        "### Instruction:\n", "\n\n### Response:", "\n"),
    "deepseek-coder": Template(
        "<FLM_FIX_TOKEN_32013>\tYou are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, "
        "and you only answer questions related to computer science. For politically sensitive questions, security and privacy issues, "
        "and other non-computer science questions, you will refuse to answer.\n",
        "### Instruction:\n", "\n### Response:\n", "\n<|EOT|>\n"),
}
PRESETS["sus-chat"] = PRESETS["yi"]
# fastllm's tools/llamalike2flm.py strings for the families it special-cases
PRESETS["internlm2"] = Template(
    "<s><|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).\n<|im_end|>",
    "<|im_start|>user\n", "<|im_end|><|im_start|>assistant\n", "<|im_end|>\n", **_CHATML_SYS)
PRESETS["qwen2"] = Template("<|im_start|>system\nYou are a helpful assistant.<|im_end|>", "<|im_start|>user\n",
                            "<|im_end|><|im_start|>assistant\n", "<|im_end|>\n", **_CHATML_SYS)


# (substrings that must all appear in the lower-cased model name or path, preset)
_GUESSES = [
    (("internlm2",), "internlm2"), (("internlm",), "internlm"), (("xverse",), "xverse"), (("vicuna",), "vicuna"),
    (("billa",), "billa"), (("chinese-alpaca-2",), "chinese-alpaca-2"), (("codellama", "instruct"), "codellama-instruct"),
    (("llama-2", "chat"), "llama2-chat"), (("llama2", "chat"), "llama2-chat"), (("yulan",), "yulan"),
    (("sus-chat",), "sus-chat"), (("yi-", "chat"), "yi"), (("wizardcoder",), "wizardcoder"),
    (("deepseek-coder", "instruct"), "deepseek-coder"),
]


def guess_preset(*names: str) -> str | None:
    """A cookbook preset for a model, from its folder name or `_name_or_path`."""
    for name in names:
        lowered = (name or "").lower()
        for needles, preset_name in _GUESSES:
            if all(n in lowered for n in needles):
                return preset_name
    return None


def preset(name: str) -> Template:
    if name not in PRESETS:
        raise TemplateError(f"unknown template {name!r}; `flm templates` lists: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def template_from_kv(kv: dict[str, str]) -> Template | None:
    """The four fastllm strings from a .flm key/value table, if the file sets any of them
    (with the system-message placement of the preset it names, if any)."""
    if not any(k in kv for k in TEMPLATE_KEYS):
        return None
    base = PRESETS.get(kv.get(TEMPLATE_NAME_KEY, ""), PRESETS["base"])
    return Template(*(kv.get(k, "") for k in TEMPLATE_KEYS), system_format=base.system_format,
                    system_in_first_user=base.system_in_first_user)


MAX_RENDER_CHARS = 1 << 20  # a chat prompt longer than this is a runaway template
MAX_RENDER_SECONDS = 2.0


def render_chat_template(source: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                         **special: str) -> str:
    """Render a Jinja chat_template like transformers' apply_chat_template, sandboxed: no access
    to Python internals, loops bounded, and output size and time limited."""
    import time

    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"chat_template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = _bounded_range
    env.filters["tojson"] = _tojson
    try:
        template = env.from_string(source)
        parts, size, deadline = [], 0, time.monotonic() + MAX_RENDER_SECONDS
        for chunk in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **special):
            parts.append(chunk)
            size += len(chunk)
            if size > MAX_RENDER_CHARS or time.monotonic() > deadline:
                raise TemplateError("chat_template output runs past its size or time limit")
        return "".join(parts)
    except TemplateError:
        raise
    except (JinjaError, TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise TemplateError(f"chat_template failed to render: {exc}") from None


def _bounded_range(*args: int) -> range:
    """range() for templates: chat templates iterate over messages, never over millions."""
    r = range(*args)
    if len(r) > 10_000:
        raise TemplateError("chat_template asked for a range of more than 10000 items")
    return r


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    import json

    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
