"""The LLaMA-family Transformer and its reference forward pass, in torch ops.

This is the definition every backend (`flm.backends`) is held to: one model driven only by
ModelConfig flags (no per-family branches), weights in their file dtype behind `Linear`s,
activations in float32. `forward` runs any number of new tokens for each of several sequences,
each after its own cache's contents; `run_layers` is the layer loop with the attention left to
the caller, so that a backend can replace attention (a graph-recordable GPU step does) without
rewriting the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kernels import FusedLinear, Linear
from .kv_cache import KVCache
from .rope import Rotary, apply_rotary


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: FusedLinear  # q, k and v projections, outputs side by side
    o: Linear
    gate_up: FusedLinear  # gate and up projections, outputs side by side
    down: Linear

    def attention_inputs(self, h: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of shape [batch, heads, seq, head_dim] from normalized hidden states."""
        batch, seq, _ = h.shape
        q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        q, k, v = self.qkv(h).split([q_size, kv_size, kv_size], dim=-1)
        return tuple(t.reshape(batch, seq, -1, cfg.head_dim).transpose(1, 2) for t in (q, k, v))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


# attention(i, layer, normalized states [batch, seq, hidden]) -> [batch, seq, heads * head_dim],
# keeping layer i's new keys and values wherever its maker keeps them
Attention = Callable[[int, Layer, torch.Tensor], torch.Tensor]


class EmbeddingTable:
    """Token rows looked up where the table lies. A float table is kept as its stored bytes, one
    row of bytes per token: a file offset not aligned to the element size (any odd-length name
    before it) would otherwise force a copy of the whole table, while a gathered row is aligned
    and viewed as floats for free."""

    def __init__(self, rows: torch.Tensor, dtype: torch.dtype):
        self.rows = rows  # [vocab, hidden * itemsize] uint8, or [vocab, hidden] float32
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        picked = self.rows.index_select(0, tokens.reshape(-1)).reshape(*tokens.shape, -1)
        if picked.dtype == torch.uint8:
            picked = picked.view(self.dtype)
        return picked.to(torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) in float32, as transformers' LlamaRMSNorm, in one op."""
    return F.rms_norm(x, weight.shape, weight, eps)


class Transformer:
    def __init__(self, cfg: ModelConfig, embed: EmbeddingTable, layers: list[Layer], norm: torch.Tensor,
                 lm_head: Linear):
        self.cfg = cfg
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.rotary = Rotary(cfg)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, caches: list[KVCache], last_only: bool = True) -> torch.Tensor:
        """Logits [batch, seq or 1, vocab] for tokens [batch, seq]: row b continues the sequence
        of caches[b] at its own position. Every new key and value is stored in its cache at
        slots length..length+seq; advancing `length` is the caller's (the backend's) step."""
        batch, seq = tokens.shape
        cfg = self.cfg
        positions = [torch.arange(c.length, c.length + seq, device=self.device)[None] for c in caches]
        # per sequence: dynamic NTK's angles depend on each sequence's own length
        cos, sin = (torch.cat(parts) for parts in zip(*(self.rotary.cos_sin(p) for p in positions)))

        def attention(i: int, layer: Layer, h: torch.Tensor) -> torch.Tensor:
            q, k, v = layer.attention_inputs(h, cfg)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            out = []
            for b, cache in enumerate(caches):
                keys, values = cache.store(i, k[b], v[b])  # as stored: rounded to the cache's dtype
                out.append(attend(q[b:b + 1], keys[None], values[None], cache.length, cfg.sliding_window))
            return torch.cat(out).transpose(1, 2).reshape(batch, seq, -1)

        x = self.run_layers(self.embed(tokens.to(self.device)), attention)
        return self.output(x[:, -1:] if last_only else x)

    def run_layers(self, x: torch.Tensor, attention: Attention) -> torch.Tensor:
        """Every layer on hidden states x [batch, seq, hidden], with `attention` for each."""
        eps = self.cfg.rms_norm_eps
        for i, layer in enumerate(self.layers):
            x = x + layer.o(attention(i, layer, rms_norm(x, layer.input_norm, eps)))
            x = x + layer.mlp(rms_norm(x, layer.post_norm, eps))
        return x

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's hidden states: the final norm and the output layer."""
        return self.lm_head(rms_norm(x, self.norm, self.cfg.rms_norm_eps))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None = None) -> torch.Tensor:
    """Causal attention of new queries q [1, heads, seq, dim] at positions start.. over the keys
    and values k, v [1, kv_heads, start + seq, dim] of every position up to the last query; with
    a sliding window, query i sees keys j with i - window < j <= i (transformers' Mistral).
    One query (a decode step) takes the query heads that share a KV head as rows of one small
    matmul, so a grouped-query cache is never copied and no mask is needed."""
    batch, heads, seq, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    if seq == 1:
        if window is not None and total > window:
            k, v = k[:, :, -window:], v[:, :, -window:]
        stacked = q.reshape(batch, kv_heads, heads // kv_heads, dim)
        scores = torch.matmul(stacked, k.transpose(-1, -2)) * dim ** -0.5
        return torch.matmul(torch.softmax(scores, dim=-1), v).reshape(batch, heads, 1, dim)
    # grouped-query heads read their KV head in place (enable_gqa), not from repeated copies
    if start == 0 and (window is None or total <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads > kv_heads)
    rows = torch.arange(start, start + seq, device=q.device)[:, None]
    cols = torch.arange(total, device=q.device)[None, :]
    mask = cols <= rows
    if window is not None:
        mask &= cols > rows - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads > kv_heads)
