"""fastllm_pytools.torch2flm -> flm.torch2flm (thin forwarder)."""

from flm.torch2flm import tofile

__all__ = ["tofile"]
