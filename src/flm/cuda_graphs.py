"""CUDA graphs for decode steps: one sequence's (per cache) and the server's batches (per size).

On a GPU the eager decode step is about a thousand small kernels launched one by one from
Python, so it is bound by launch overhead, not by the GPU (the 1.1B model decoded 48 tok/s in
float16 on an H200, whose ~4100 GB/s would read its 2.2 GB of weights ~1800 times a second;
64 with the same eager step in a later run, 112 replayed). A graph recorded once per cache
replays the whole step in one call. It is recorded over the cache's current storage with
every shape fixed by its capacity: RoPE comes from a table of every slot's angles, the token and
position are device tensors filled before each replay, and attention reads the slots up to the
position (`kernels/triton_decode.py`; without Triton, torch ops cover all slots and mask the
ones the query does not see). The server's batched steps replay one graph per batch size whose
kernels find each sequence's cache through a table of addresses refilled before each replay
(`GraphedBatch`; with Triton only; FLM_BATCH_GRAPHS=0 runs them eagerly).
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Callable

import torch

from .kernels import triton_decode

if TYPE_CHECKING:
    from .model import KVCache, Transformer


class GraphedStep:
    """Decode steps of one sequence over one cache's storage (batch 1)."""

    def __init__(self, model: Transformer, cache: KVCache, tables: tuple[torch.Tensor, torch.Tensor]):
        """`tables`: the model's rotary cos and sin [rows >= capacity, head_dim] (Rotary.tables)."""
        device = cache.keys[0].device
        self.device = device
        self.token = token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = position = torch.zeros(1, dtype=torch.long, device=device)
        cos_table, sin_table = tables
        keys, values = list(cache.keys), list(cache.values)  # the tensors, not the cache: no cycle
        addresses = triton_decode.CacheAddresses([keys], [values]) if model.fused_attention else None

        def step() -> torch.Tensor:  # locals, not self: see _record
            return model.decode_in_place(token, position, cos_table, sin_table, keys, values, addresses)

        self._step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, 1, vocab] for `token` at `position`; its keys and values land in the cache."""
        self.token.fill_(token)
        self.position.fill_(position)
        if self.graph is None:
            self._record()
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the graph's output

    def _record(self) -> None:
        self.graph, self.logits = _record(self._step, self.device)


class GraphedBatch:
    """Decode steps of `batch` sequences, each in its own cache (the server's step), replayed
    from one graph per batch size: the fused kernels find the caches through an address table
    (`triton_decode.CacheAddresses`) that is refilled before each replay, so sequences joining,
    leaving or growing their caches need no new recording. Recorded over the model's rotary
    tables; made again when those grow."""

    def __init__(self, model: Transformer, caches: list[KVCache], tables: tuple[torch.Tensor, torch.Tensor]):
        device = caches[0].keys[0].device
        self.device, self.tables = device, tables
        self.tokens = tokens = torch.zeros((len(caches), 1), dtype=torch.long, device=device)
        self.positions = positions = torch.zeros(len(caches), dtype=torch.long, device=device)
        self.addresses = addresses = triton_decode.CacheAddresses([c.keys for c in caches], [c.values for c in caches])

        def step() -> torch.Tensor:  # locals, not self: see _record
            return model.decode_in_place(tokens, positions, *tables, [], [], addresses)

        self._step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def fill(self, tokens: list[int], caches: list[KVCache]) -> None:
        """The step's inputs: each sequence's token, position (its cache's length) and cache."""
        self.tokens.copy_(torch.tensor(tokens, dtype=torch.long).view(-1, 1))
        self.positions.copy_(torch.tensor([c.length for c in caches], dtype=torch.long))
        self.addresses.point_to([c.keys for c in caches], [c.values for c in caches])

    def __call__(self, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
        """Logits [batch, 1, vocab]; each token's keys and values land in its sequence's cache."""
        self.fill(tokens, caches)
        if self.graph is None:
            self.graph, self.logits = _record(self._step, self.device)
        self.graph.replay()
        self.addresses.forget()
        return self.logits.clone()


def _record(step: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A graph of step() and the tensor its replays write the output to. A warm-up on a side
    stream first (torch's recipe: lazy initialisations stay out of the graph); it writes the
    step's keys and values exactly as the replay then does. Python's cycle collector is off
    while recording: freeing another graph (one a cache or the model let go of) in the middle
    of a capture invalidates it ("operation not permitted when stream is capturing", seen on an
    H200 when a batch size's graph was recorded again), and torch no longer collects before a
    capture. The steps' closures hold no reference back to their owner, so dropped graphs go
    at once, by reference count, and do not wait for the collector."""
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


def graphed_step(model: Transformer, cache: KVCache) -> GraphedStep | None:
    """The cache's graphed step (made on first use), or None where graphs do not apply: off
    CUDA, switched off, a cache of several sequences, or dynamic NTK RoPE past the trained
    length (its angles depend on the sequence length, not only on the position)."""
    if not model.cuda_graphs or model.embed.device.type != "cuda" or cache.keys[0].shape[0] != 1:
        return None
    if cache.graph_step is None:
        tables = model.rotary.tables(cache.capacity, cache.keys[0].device)
        if tables is None:  # dynamic NTK past the trained length
            return None
        cache.graph_step = GraphedStep(model, cache, tables)
    return cache.graph_step


def graphed_batch(model: Transformer, caches: list[KVCache]) -> GraphedBatch | None:
    """The model's graphed step for this many sequences (made on first use, again when the
    rotary tables grow), or None where it does not apply: off CUDA, switched off (FLM_CUDA_GRAPHS=0
    or FLM_BATCH_GRAPHS=0), without the fused kernels (Triton), or dynamic NTK past the trained
    length."""
    device = model.embed.device
    if not (model.cuda_graphs and model.graph_batches and model.fused_attention) or device.type != "cuda":
        return None
    tables = model.rotary.tables(max(c.length for c in caches) + 1, device)
    if tables is None:
        return None
    graphed = model.batch_graphs.get(len(caches))
    if graphed is None or graphed.tables[0] is not tables[0]:
        graphed = model.batch_graphs[len(caches)] = GraphedBatch(model, caches, tables)
    return graphed
