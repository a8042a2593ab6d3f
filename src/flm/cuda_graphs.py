"""CUDA graphs for one-sequence decode.

On a GPU the eager decode step is about a thousand small kernels launched one by one from
Python, so it is bound by launch overhead, not by the GPU (the 1.1B model decoded 48 tok/s in
float16 on an H200, whose ~4100 GB/s would read its 2.2 GB of weights ~1800 times a second;
64 with the same eager step in a later run, 112 replayed). A graph recorded once per cache
replays the whole step in one call. It is recorded over the cache's current storage with
every shape fixed by its capacity: RoPE comes from a table of every slot's angles, the token and
position are device tensors filled before each replay, and attention reads the slots up to the
position (`kernels/triton_decode.py`; without Triton, torch ops cover all slots and mask the
ones the query does not see).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        cos_table, sin_table = tables
        keys, values = list(cache.keys), list(cache.values)  # the tensors, not the cache: no cycle
        addresses = triton_decode.CacheAddresses([keys], [values]) if model.fused_attention else None

        def step() -> torch.Tensor:
            return model.decode_in_place(self.token, self.position, cos_table, sin_table, keys, values, addresses)

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
        # warm-up on a side stream first (torch's recipe: lazy initialisations stay out of the
        # graph); it writes this position's keys and values exactly as the replay then does
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph


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
