"""Compatibility shim: `from fastllm_pytools import llm, torch2flm` runs the cookbook unchanged."""
