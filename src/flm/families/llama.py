"""LLaMA-shaped checkpoints: LLaMA 1/2, CodeLlama, Vicuna, Alpaca, Chinese-Alpaca-2, BiLLa,
WizardCoder, Deepseek-Coder, Yi, SUS, YuLan, XVERSE and Mistral all store `LlamaForCausalLM`
tensor names and differ only in config values and prompt templates."""

from .base import Family


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "xverse", "yi", "deepseek", "baichuan_llama")
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "XverseForCausalLM", "YiForCausalLM")
