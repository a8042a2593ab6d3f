"""The GPU's decode step: recorded once per batch size as a CUDA graph and replayed per token.

An eager one-token step is about a thousand small kernels launched one by one from Python, so
it is bound by launch overhead, not by the GPU (bench/HISTORY.md, "Served batches from graphs").
A graph replays the whole step in one call. Everything in it has a fixed shape: the tokens and
positions are device tensors filled before each replay, RoPE reads rows of a table of every
position's angles, and each layer's RoPE, cache write and attention are two Triton kernels
(kernels/triton_decode.py) that find every sequence's cache through a device table of addresses
refilled before a replay when the caches changed. So sequences joining, leaving or growing
their caches need no new recording; a graph is recorded again only when the rotary table grows.
Prompts run the reference forward (its linears are the Triton kernels of kernels/triton_linear).
Steps whose angles depend on each sequence's length (dynamic NTK past the trained length) run
the reference forward too.

Off a GPU (`record=False`) the same step runs unrecorded, its Triton kernels in Triton's
interpreter: that is how the tests hold it to the reference on a CPU.
"""

from __future__ import annotations

import gc
from typing import Callable

import torch

from ..kernels import triton_decode, triton_linear
from ..kv_cache import KVCache
from ..model import Layer, Transformer
from .base import Backend, BackendUnavailable


class CudaGraphBackend(Backend):
    name = "cuda-graph"

    def __init__(self, model: Transformer, window: int | None = None, kv_dtype: torch.dtype = torch.float32,
                 record: bool = True):
        super().__init__(model, window, kv_dtype)
        if not triton_linear.available():
            raise BackendUnavailable("Triton is not installed (or FLM_KERNELS=reference turned its kernels off)")
        device = model.device
        if record and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (7, 0)):
            raise BackendUnavailable("needs a CUDA GPU of compute capability 7.0 or later (Triton's minimum)")
        self.record = record
        self.graphs: dict[int, GraphedBatch] = {}  # by batch size

    def _step(self, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
        tables = self.model.rotary.tables(max(c.length for c in caches) + 1, self.model.device)
        if tables is None:
            return super()._step(tokens, caches)
        graphed = self.graphs.get(len(caches))
        if graphed is None or graphed.tables[0] is not tables[0]:
            graphed = self.graphs[len(caches)] = GraphedBatch(self.model, caches, tables, self.record)
        return graphed(tokens, caches)


def fixed_shape_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor,
                     tables: tuple[torch.Tensor, torch.Tensor], caches: triton_decode.CacheAddresses) -> torch.Tensor:
    """Logits [B, vocab] of one token per sequence, every input a tensor on the device: tokens
    [B, 1], positions [B], rotary tables [rows, head_dim]; each key and value is written at its
    position in the cache `caches` points to."""
    cfg = model.cfg
    cos_table, sin_table = tables

    def attention(i: int, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        q = triton_decode.rotary_store(layer.qkv(h), cos_table, sin_table, positions, caches, i, cfg.num_attention_heads)
        return triton_decode.decode_attention(q, caches, i, positions, cfg.sliding_window).view(h.shape[0], 1, -1)

    return model.output(model.run_layers(model.embed(tokens), attention))[:, 0]


class GraphedBatch:
    """Decode steps of a fixed number of sequences, each in its own cache, replayed from one
    graph (or, unrecorded, run directly)."""

    def __init__(self, model: Transformer, caches: list[KVCache], tables: tuple[torch.Tensor, torch.Tensor],
                 record: bool):
        device = model.device
        self.device, self.tables, self.record = device, tables, record
        self.inputs = torch.zeros((2, len(caches)), dtype=torch.long, device=device)  # tokens, positions
        tokens, positions = self.inputs[0].view(-1, 1), self.inputs[1]
        self.addresses = addresses = triton_decode.CacheAddresses(caches)

        def step() -> torch.Tensor:  # locals, not self: see _record
            return fixed_shape_step(model, tokens, positions, tables, addresses)

        self._step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
        """Logits [batch, vocab]; each token's key and value land in its sequence's cache."""
        self.inputs.copy_(torch.tensor([tokens, [c.length for c in caches]], dtype=torch.long))
        self.addresses.point_to(caches)
        with torch.inference_mode():
            if not self.record:
                logits = self._step()
            else:
                if self.graph is None:
                    self.graph, self.logits = _record(self._step, self.device)
                self.graph.replay()
                logits = self.logits.clone()  # the next replay overwrites the graph's output
        self.addresses.forget()
        return logits


def _record(step: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A graph of step() and the tensor its replays write the output to. A warm-up on a side
    stream first (torch's recipe: lazy initialisations stay out of the graph); it writes the
    step's keys and values exactly as the replay then does. Python's cycle collector is off
    while recording: freeing another graph in the middle of a capture invalidates it ("operation
    not permitted when stream is capturing"), and torch no longer collects before a capture. The
    step's closure holds no reference back to its owner, so a dropped graph goes at once, by
    reference count, and does not wait for the collector."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            out = step()
    finally:
        if collecting:
            gc.enable()
    return graph, out
