"""Ways of running a Transformer, one per device, chosen once when a model is loaded.

| backend      | device | prompts                      | one-token steps                          |
|--------------|--------|------------------------------|------------------------------------------|
| `torch`      | any    | `Transformer.forward`        | `Transformer.forward`                    |
| `cpu-step`   | CPU    | `Transformer.forward`        | one C++ call (backends/cpu_step.py)      |
| `cuda-graph` | GPU    | `Transformer.forward`        | a replayed CUDA graph (backends/cuda_graph.py) |

`choose_backend` takes the fastest one the device and the weights allow; FLM_BACKEND names one
instead (an error when it cannot run, saying why). The linears inside `Transformer.forward` are
chosen per weight at load (kernels/: SIMD on the CPU, Triton on a GPU, reference with
FLM_KERNELS=reference).
"""

from __future__ import annotations

import logging

import torch

from ..errors import FlmError
from ..model import Transformer
from ..settings import setting
from .base import Backend, BackendUnavailable
from .cpu_step import CpuStepBackend
from .cuda_graph import CudaGraphBackend

log = logging.getLogger("flm")

FAST = {"cpu": CpuStepBackend, "cuda": CudaGraphBackend}  # the backend each device type prefers
BACKENDS = {cls.name: cls for cls in (Backend, CpuStepBackend, CudaGraphBackend)}


def choose_backend(model: Transformer, window: int | None = None, kv_dtype: torch.dtype = torch.float32) -> Backend:
    """The backend FLM_BACKEND names, else the device's fast one where it can run, else torch;
    `window` and `kv_dtype` as Backend takes them."""
    wanted = setting("FLM_BACKEND")
    if wanted == Backend.name:
        return Backend(model, window, kv_dtype)
    fast = FAST.get(model.device.type)
    if wanted != "auto" and BACKENDS[wanted] is not fast:
        raise FlmError(f"FLM_BACKEND={wanted} does not run on {model.device.type}; unset it or use "
                       f"{'torch' if fast is None else f'torch or {fast.name}'}")
    try:
        return fast(model, window, kv_dtype) if fast is not None else Backend(model, window, kv_dtype)
    except BackendUnavailable as exc:
        if wanted != "auto":
            raise FlmError(f"FLM_BACKEND={wanted}: {exc}") from None
        log.info("decode steps run on the torch backend: %s", exc)
        return Backend(model, window, kv_dtype)


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "CpuStepBackend", "CudaGraphBackend", "choose_backend"]
