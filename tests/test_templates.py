"""Prompt presets (the cookbook's strings, character for character) and chat_template rendering."""

import json

import pytest

from flm.convert import ConvertOptions, choose_template
from flm.errors import TemplateError
from flm.templates import PRESETS, guess_preset, preset, render_chat_template
from tokenizer_fixtures import tokenizer_dir

HISTORY = [("Hi", "Hello!")]
QUERY = "What is 1+1?"
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make "
    "any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information."
)

EXPECTED = {
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\nHi\n\n### Response:Hello!</s>### Instruction:\nWhat is 1+1?\n\n### Response:",
    "base": "HiHello!What is 1+1?",
    "base-bos": "<FLM_FIX_TOKEN_1>HiHello!What is 1+1?",
    "internlm": "<s><s><|User|>:Hi<eoh>\n<|Bot|>:Hello!<eoa>\n<s><|User|>:What is 1+1?<eoh>\n<|Bot|>:",
    "internlm2": "<s><|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).\n<|im_end|>"
                 "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n"
                 "What is 1+1?<|im_end|><|im_start|>assistant\n",
    "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>"
             "assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|><|im_start|>assistant\n",
    "xverse": "Human: Hi\n\nAssistant: Hello!<FLM_FIX_TOKEN_3>Human: What is 1+1?\n\nAssistant: ",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:Hello!<s>USER: What is 1+1? ASSISTANT:",
    "billa": "\nHuman: Hi\nAssistant: Hello!\nHuman: What is 1+1?\nAssistant: ",
    "llama2-chat": "<FLM_FIX_TOKEN_1>[INST] Hi [/INST]Hello! <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>[INST] What is 1+1? [/INST]",
    "llama2-chat-system": "<FLM_FIX_TOKEN_1>[INST] <<SYS>>\n" + LLAMA2_SYSTEM + "\n<</SYS>>\n\n Hi [/INST]Hello! "
                          "<FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1> What is 1+1? [/INST]",
    "codellama-instruct": "<FLM_FIX_TOKEN_1>[INST] Hi [/INST]Hello! <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>[INST] What is 1+1? [/INST]",
    "chinese-alpaca-2": "<FLM_FIX_TOKEN_1>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
                        " Hi [/INST]Hello! <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1> What is 1+1? [/INST]",
    "yulan": "The following is a conversation between a human and an AI assistant namely YuLan, developed by GSAI, "
             "Renmin University of China. The AI assistant gives helpful, detailed, and polite answers to the user's "
             "questions.\n[|Human|]:Hi\n[|AI|]:Hello!\n[|Human|]:What is 1+1?\n[|AI|]:",
    "yi": "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 1+1?"
          "<|im_end|><|im_start|>assistant\n",
    "sus-chat": "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 1+1?"
                "<|im_end|><|im_start|>assistant\n",
    "wizardcoder": "Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\nHi\n\n### Response:Hello!\n### Instruction:\nWhat is 1+1?\n\n### Response:",
    "deepseek-coder": "<FLM_FIX_TOKEN_32013>\tYou are an AI programming assistant, utilizing the Deepseek Coder model, "
                      "developed by Deepseek Company, and you only answer questions related to computer science. For "
                      "politically sensitive questions, security and privacy issues, and other non-computer science "
                      "questions, you will refuse to answer.\n### Instruction:\nHi\n### Response:\nHello!\n<|EOT|>\n"
                      "### Instruction:\nWhat is 1+1?\n### Response:\n",
}


def test_every_preset_is_spelled_out():
    assert set(EXPECTED) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_round_prompt(name):
    assert preset(name).prompt(QUERY, HISTORY) == EXPECTED[name]


def test_llama2_multi_turn_with_system_matches_meta_format():
    """Meta's Llama-2 chat format: <<SYS>> inside the first [INST], every round closed by </s><s>."""
    got = preset("llama2-chat").prompt("Q2", [("Q1", "A1")], system="Be brief.")
    assert got == ("<FLM_FIX_TOKEN_1>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ1 [/INST]A1 "
                   "<FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>[INST] Q2 [/INST]")


def test_unknown_preset():
    with pytest.raises(TemplateError, match="flm templates"):
        preset("nope")


@pytest.mark.parametrize("name,expected", [
    ("internlm-chat-7b", "internlm"), ("internlm2-chat-1_8b", "internlm2"), ("Llama-2-7b-chat-hf", "llama2-chat"),
    ("CodeLlama-7b-Instruct-hf", "codellama-instruct"), ("vicuna-7b-v1.3", "vicuna"), ("Yi-6B-Chat", "yi"),
    ("deepseek-coder-1.3b-instruct", "deepseek-coder"), ("XVERSE-13B-Chat", "xverse"), ("llama-7b", None),
])
def test_preset_guess(name, expected):
    assert guess_preset(name) == expected


def test_choose_template_priority():
    raw = {"user_role": "U:"}
    name, tpl, source = choose_template(raw, ConvertOptions(template="vicuna", bot_role="B:"), None)
    assert (name, source) == ("vicuna", "explicit")
    assert (tpl.pre_prompt, tpl.user_role, tpl.bot_role) == (PRESETS["vicuna"].pre_prompt, "U:", "B:")
    assert choose_template({}, ConvertOptions(), None, ("vicuna-13b",))[0::2] == ("vicuna", "guess")
    assert choose_template({}, ConvertOptions(), None, ("mystery",)) == (None, None, "")


def _apply(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("name", ["llama3", "qwen3", "deepseek_v3", "smollm2"])
@pytest.mark.parametrize("with_system", [False, True])
def test_chat_template_matches_transformers(name, with_system):
    from transformers import AutoTokenizer

    folder = tokenizer_dir(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = ([{"role": "system", "content": "You are terse."}] if with_system else []) + [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": QUERY}]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in config.items()
               if k.endswith("_token") and isinstance(v, (str, dict))}
    template = tokenizer.chat_template
    assert render_chat_template(template, messages, add_generation_prompt=True, **special) == _apply(tokenizer, messages)


def test_chat_template_errors_are_typed():
    with pytest.raises(TemplateError, match="refused the conversation: roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(TemplateError, match="failed to render"):
        render_chat_template("{% for x in %}", [])
    with pytest.raises(TemplateError):  # the sandbox keeps Python internals out of reach
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])


def test_runaway_templates_are_stopped():
    with pytest.raises(TemplateError, match="range of more than"):
        render_chat_template("{% for i in range(10**9) %}{% endfor %}", [])
    with pytest.raises(TemplateError, match="size or time limit"):
        render_chat_template("{% for i in range(10000) %}{% for j in range(10000) %}xxxxxxxx{% endfor %}{% endfor %}", [])


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_files_prompts_come_from_one_place(tmp_path, tiny_dir):
    """Where the model's own chat_template is in charge (no preset, or one guessed from the name
    or family), the file carries it under `chat_template`, the key fastllm renders with, and no
    prompt strings; a preset chosen on purpose writes fastllm's strings and no template, so that
    fastllm and flm build the same prompt from either file."""
    import shutil

    from flm import llm
    from flm.convert import convert
    from flm.format.flm import read_flm

    src = tmp_path / "hf"
    shutil.copytree(tiny_dir, src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    own, chosen = tmp_path / "own.flm", tmp_path / "chosen.flm"
    convert(src, own, ConvertOptions(dtype="float32", progress=False))
    convert(src, chosen, ConvertOptions(dtype="float32", template="vicuna", progress=False))

    kv = read_flm(own).kv
    assert kv["chat_template"] == CHATML and "pre_prompt" not in kv and "flm.chat_template" not in kv
    assert llm.model(own).get_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    kv = read_flm(chosen).kv
    assert "chat_template" not in kv and kv["user_role"] == PRESETS["vicuna"].user_role
    assert llm.model(chosen).get_prompt("hi") == PRESETS["vicuna"].prompt("hi", [])


@pytest.mark.parametrize("kv,expected", [
    ({"chat_template": CHATML, "pre_prompt": "P", "user_role": "U"}, "template"),  # fastllm: the template wins
    ({"pre_prompt": "P", "user_role": "U"}, "strings"),
    ({}, "neither"),
    ({"flm.chat_template": CHATML, "user_role": "U", "flm.template_source": "explicit"}, "strings"),
    ({"flm.chat_template": CHATML, "user_role": "U", "flm.template_source": "guess"}, "template"),
    ({"flm.chat_template": CHATML}, "template"),
])
def test_prompt_sources_as_fastllm_reads_them(kv, expected):
    """fastllm's rule for a `chat_template` key, and flm's earlier files (flm.chat_template) as they were read."""
    from flm.llm import _prompt_sources

    template, strings = _prompt_sources(kv)
    got = "template" if template == CHATML else "strings" if strings is not None else "neither"
    assert got == expected
    assert template is None or strings is None
