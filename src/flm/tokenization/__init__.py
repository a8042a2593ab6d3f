"""Tokenizers: the runtime one (Hugging Face `tokenizers` plus fastllm's <FLM_FIX_TOKEN_N>), ones
rebuilt from a fastllm vocabulary table or a GGUF vocabulary, the byte-level splits of known
families, and a checkpoint's tokenizer files."""
