"""The key/value table of a .flm file: the keys fastllm defines (its writer writes them, its C++
reader acts on them) and the `flm.*` keys flm adds, which fastllm ignores."""

from __future__ import annotations

# fastllm's prompt strings (the cookbook's "方案二"): pre_prompt + rounds of user_role + query +
# bot_role (+ answer + history_sep)
TEMPLATE_KEYS = ("pre_prompt", "user_role", "bot_role", "history_sep")

# fastllm's tokenizer switches ("1"/"0" or "True"/"False" as its writers spell them)
USE_SCORE = "tokenizer_use_score"  # the vocabulary table carries a score per piece
HAS_SPECIAL_TOKENS = "tokenizer_has_special_tokens"  # a special-token list follows the vocabulary
ADD_DUMMY_PREFIX = "tokenizer_add_dummy_prefix"  # SentencePiece's leading "▁"
REMOVE_EXTRA_WHITESPACES = "tokenizer_remove_extra_whitespaces"  # SentencePiece's whitespace collapsing
BYTE_AS_CHAR = "tokenizer_byte_as_char"  # byte-level (GPT-2 style) pieces
NFKC = "tokenizer_nfkc"  # NFKC-normalize the input first (XVERSE)

# a Jinja chat template: when present, fastllm (src/fastllm.cpp) renders every prompt with it and
# ignores the prompt strings above; flm writes it only where the model's own template is in charge
CHAT_TEMPLATE_KEY = "chat_template"

# flm's extras
NORMALIZED_KEY = "flm.config"  # the normalized ModelConfig as JSON
TOKENIZER_JSON_KEY = "flm.tokenizer_json"  # the complete tokenizer.json
TOKENIZER_CONFIG_KEY = "flm.tokenizer_config"  # tokenizer_config.json's special-token strings
LEGACY_CHAT_TEMPLATE_KEY = "flm.chat_template"  # where flm's files before 2026-12-08 kept the template
TEMPLATE_NAME_KEY = "flm.template"  # the preset the prompt strings came from
TEMPLATE_SOURCE_KEY = "flm.template_source"  # how it was chosen: explicit, config, family, guess
FORMAT_KEY = "flm.format"  # a note on the writer
