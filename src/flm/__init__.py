"""flm: LLaMA-family models in fastllm's .flm format, converted with bounded memory and run fast."""

__version__ = "0.1.0"
