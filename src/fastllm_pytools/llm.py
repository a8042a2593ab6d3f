"""fastllm_pytools.llm -> flm.llm (thin forwarder)."""

from flm.llm import from_hf, get_cpu_threads, model, set_cpu_threads

__all__ = ["from_hf", "get_cpu_threads", "model", "set_cpu_threads"]
