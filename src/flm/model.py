"""One LLaMA-family Transformer, driven only by ModelConfig flags (no per-family branches).

Weights stay in their file dtype (memory-mapped where possible); activations are float32.
A KVCache preallocates keys and values for `batch` sequences of up to `max_len` tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .cuda_graphs import GraphedBatch, graphed_batch, graphed_step
from .errors import ContextOverflowError, FlmFormatError
from .families import canonical_shapes
from .format.flm import FlmFile
from .kernels import FusedLinear, Linear, make_linear, triton_decode
from .kernels.decode import build_decode_step
from .quant import FLOAT_DTYPES, DType, Quantized
from .rope import Rotary, apply_rotary


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: FusedLinear  # q, k and v projections, outputs side by side
    o: Linear
    gate_up: FusedLinear  # gate and up projections, outputs side by side
    down: Linear

    def attention_inputs(self, h: torch.Tensor, cfg: ModelConfig):
        """q, k, v of shape [batch, heads, seq, head_dim] from normalized hidden states."""
        batch, seq, _ = h.shape
        q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        q, k, v = self.qkv(h).split([q_size, kv_size, kv_size], dim=-1)
        return tuple(t.reshape(batch, seq, -1, cfg.head_dim).transpose(1, 2) for t in (q, k, v))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


# attention(i, layer, normalized states [batch, seq, hidden]) -> [batch, seq, heads * head_dim]
Attention = Callable[[int, Layer, torch.Tensor], torch.Tensor]


class KVCache:
    """Keys/values for `batch` sequences: [layers][batch, kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", initial: int | None = None):
        self.max_len = max_len  # hard limit (the context window)
        self.capacity = min(max_len, initial or self.INITIAL)
        shape = (batch, cfg.num_key_value_heads, self.capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # tokens stored (same for every sequence in this simple cache)
        self._views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.graph_step = None  # a CUDA graph recorded over this storage (cuda_graphs.GraphedStep)

    INITIAL = 512

    def sequence_views(self, b: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer [kv_heads, capacity, head_dim] views of sequence b's keys and values (what
        the C++ decode step writes to); made once per growth, not per token."""
        if b not in self._views:
            self._views[b] = ([k[b] for k in self.keys], [v[b] for v in self.values])
        return self._views[b]

    def reserve(self, needed: int) -> None:
        """Grow (doubling, up to max_len) so that `needed` tokens fit."""
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise ContextOverflowError(f"{needed} tokens do not fit in the context window of {self.max_len} tokens")
        new_capacity = min(self.max_len, max(needed, 2 * self.capacity))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros(old.shape[:2] + (new_capacity,) + old.shape[3:])
                grown[:, :, : self.length] = old[:, :, : self.length]
                store[i] = grown
        self.capacity = new_capacity
        self._views.clear()
        self.graph_step = None  # it wrote to the old tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class EmbeddingTable:
    """Token rows looked up where the table lies. A float table is kept as its stored bytes, one
    row of bytes per token: a file offset not aligned to the element size (any odd-length name
    before it) would otherwise force a copy of the whole table (262 MB for 32000 x 2048 float32),
    while a gathered row is aligned and viewed as floats for free."""

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
    """weight * x / sqrt(mean(x^2) + eps) in float32, as transformers' LlamaRMSNorm, in one op
    (the six-op spelling cost more than the layer's small matmuls in decode)."""
    return F.rms_norm(x, weight.shape, weight, eps)


class Transformer:
    def __init__(self, cfg: ModelConfig, embed: EmbeddingTable, layers: list[Layer], norm: torch.Tensor,
                 lm_head: Linear, device: str = "cpu"):
        self.cfg = cfg
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.rotary = Rotary(cfg)
        self.device = device
        # one-token steps in one C++ call when every layer is on the SIMD kernels (else None; on a
        # GPU not even compiled)
        on_cpu = embed.device.type == "cpu"
        self.decode_step = build_decode_step(cfg, layers, norm, lm_head, embed) if on_cpu else None
        # on a GPU, one-sequence decode steps replay a CUDA graph (FLM_CUDA_GRAPHS=0: eager)
        self.cuda_graphs = os.environ.get("FLM_CUDA_GRAPHS", "1") != "0"
        # ... whose attention is two Triton kernels per layer where the linears are Triton's too
        self.fused_attention = triton_decode.applies(torch.device(device))
        # the server's steps replayed from a graph per batch size (cuda_graphs.GraphedBatch;
        # FLM_BATCH_GRAPHS=0: eager)
        self.graph_batches = os.environ.get("FLM_BATCH_GRAPHS", "1") != "0"
        self.batch_graphs: dict[int, GraphedBatch] = {}

    # ------------------------------------------------------------ loading
    @classmethod
    def from_flm(cls, flm: FlmFile, cfg: ModelConfig, reference: bool = False, device: str = "cpu") -> "Transformer":
        """Build from a parsed file, checking every tensor against the config first. On a GPU the
        weights are copied there in their file dtype and the torch kernels run on them."""
        expected = canonical_shapes(cfg)
        for name, shape in expected.items():
            rec = flm.tensors.get(name)
            if rec is None and name == "lm_head.weight":
                continue  # tied: the embedding serves
            if rec is None:
                raise FlmFormatError(flm.path, f"missing tensor {name} required by the model config")
            if tuple(rec.dims) != tuple(shape):
                raise FlmFormatError(flm.path, f"tensor {name} has shape {list(rec.dims)} but the config implies {list(shape)}")
        if device == "cpu":
            flm.prefault()  # the weights are used where they lie: map them now, not during the first prompt

        def weight(name: str):
            """Linear weights as stored bytes (no copy even when a name left them unaligned)."""
            rec = flm.tensors[name]
            if device != "cpu":
                if rec.dtype in FLOAT_DTYPES:
                    return flm.float_tensor(rec).to(device)
                q = flm.quantized(rec)
                return Quantized(q.dtype, q.mins.to(device), q.maxs.to(device), q.data.to(device), q.group, q.group_cnt)
            return flm.float_tensor(rec) if rec.dtype == DType.FLOAT32 else flm.quantized(rec)

        def plain(name: str) -> torch.Tensor:
            rec = flm.tensors[name]
            if rec.dtype not in FLOAT_DTYPES:
                raise FlmFormatError(flm.path, f"tensor {name} must be a float type, is {rec.dtype.name}")
            return flm.float_tensor(rec).to(device=device, dtype=torch.float32)

        def linear(prefix: str, shape: tuple[int, int]) -> Linear:
            bias = plain(prefix + ".bias") if prefix + ".bias" in flm.tensors else None
            return make_linear(weight(prefix + ".weight"), shape, bias, reference)

        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            s = {k: v for k, v in expected.items() if k.startswith(p)}
            q, k, v, o, gate, up, down = (linear(p + name, s[p + name + ".weight"]) for name in (
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
            layers.append(Layer(plain(p + "input_layernorm.weight"), plain(p + "post_attention_layernorm.weight"),
                                FusedLinear([q, k, v]), o, FusedLinear([gate, up]), down))
        embed_rec = flm.tensors["model.embed_tokens.weight"]
        if embed_rec.dtype in FLOAT_DTYPES:
            embed = EmbeddingTable(flm.raw(embed_rec).reshape(embed_rec.dims[0], -1).to(device),
                                   FLOAT_DTYPES[embed_rec.dtype])
        else:
            embed = EmbeddingTable(make_linear(flm.quantized(embed_rec), tuple(embed_rec.dims), reference=True)
                                   .dense().to(device), torch.float32)
        head_name = "lm_head.weight" if "lm_head.weight" in flm.tensors else "model.embed_tokens.weight"
        lm_head = make_linear(weight(head_name), (cfg.vocab_size, cfg.hidden_size), None, reference)
        return cls(cfg, embed, layers, plain("model.norm.weight"), lm_head, device)

    # ------------------------------------------------------------ forward
    def new_cache(self, batch: int = 1, max_len: int | None = None, initial: int | None = None) -> KVCache:
        return KVCache(self.cfg, batch, max_len or self.cfg.max_position_embeddings, device=self.device,
                       initial=initial)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """Logits for `tokens` [batch, seq] appended after the cache's contents."""
        cfg = self.cfg
        batch, seq = tokens.shape
        start = cache.length
        cache.reserve(start + seq)
        ids = tokens.view(-1).tolist() if seq == 1 else None  # a step's few ids: no tensor reductions
        low, high = (min(ids), max(ids)) if ids is not None else (int(tokens.min()), int(tokens.max()))
        if low < 0 or high >= cfg.vocab_size:
            raise ValueError(f"token id outside 0..{cfg.vocab_size - 1}")
        if seq == 1 and batch == 1:
            graphed = graphed_step(self, cache)
            if graphed is not None:
                logits = graphed(int(tokens[0, 0]), start)
                cache.length = start + 1
                return logits
        if seq == 1 and self.decode_step is not None:
            logits = self._one_token_logits(ids, [cache.sequence_views(b) for b in range(batch)], [start] * batch)
            cache.length = start + 1
            return logits
        tokens = tokens.to(self.embed.device)
        x = self.embed(tokens)
        positions = torch.arange(start, start + seq, device=tokens.device).expand(batch, seq)
        cos, sin = self.rotary.cos_sin(positions)
        groups, end = cfg.num_attention_heads // cfg.num_key_value_heads, start + seq

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.keys[i][:, :, start:end] = k
            cache.values[i][:, :, start:end] = v
            return _attention(q, cache.keys[i][:, :, :end], cache.values[i][:, :, :end], start, groups,
                              cfg.sliding_window)

        x = self._layers(x, self._rotated_attention(cos, sin, attend))
        cache.length = end
        if last_only:
            x = x[:, -1:]
        return self.lm_head(rms_norm(x, self.norm, cfg.rms_norm_eps))

    def _layers(self, x: torch.Tensor, attention: Attention) -> torch.Tensor:
        """Every layer on hidden states x [batch, seq, hidden]; `attention(i, layer, h)` turns layer
        i's normalized states into its attention output [batch, seq, heads * head_dim], keeping the
        new keys and values where its caller does."""
        eps = self.cfg.rms_norm_eps
        for i, layer in enumerate(self.layers):
            x = x + layer.o(attention(i, layer, rms_norm(x, layer.input_norm, eps)))
            x = x + layer.mlp(rms_norm(x, layer.post_norm, eps))
        return x

    def _rotated_attention(self, cos: torch.Tensor, sin: torch.Tensor,
                           attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Attention:
        """The attention of _layers in torch ops: q, k, v, RoPE with cos/sin, then `attend(i, q, k,
        v)`, which stores layer i's new keys and values and returns attention [batch, heads, seq, dim]."""
        cfg = self.cfg

        def attention(i: int, layer: Layer, h: torch.Tensor) -> torch.Tensor:
            batch, seq, _ = h.shape
            q, k, v = layer.attention_inputs(h, cfg)
            attn = attend(i, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
            return attn.transpose(1, 2).reshape(batch, seq, cfg.num_attention_heads * cfg.head_dim)

        return attention

    def decode_in_place(self, token: torch.Tensor, position: torch.Tensor, cos_table: torch.Tensor,
                        sin_table: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                        addresses: triton_decode.CacheAddresses | None = None) -> torch.Tensor:
        """One token per sequence with every shape fixed and every input a tensor where the model
        lies (what a CUDA graph records): tokens [sequences, 1], positions [sequences], cos/sin
        tables [rows, head_dim] of every slot's angles. Writes the tokens' keys and values at
        their positions; returns logits [sequences, 1, vocab]. With `fused_attention` (given the
        caches' `addresses`), two Triton kernels per layer (triton_decode); else, for one
        sequence, torch ops over its whole cache `keys`/`values`, the slots the query does not
        see masked."""
        cfg = self.cfg
        if self.fused_attention:
            attention = self._fused_attention(addresses, position, cos_table, sin_table)
        else:
            slots = torch.arange(keys[0].shape[2], device=position.device)
            visible = slots <= position
            if cfg.sliding_window is not None:
                visible &= slots > position - cfg.sliding_window

            def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                keys[i].index_copy_(2, position, k)
                values[i].index_copy_(2, position, v)
                return _single_query_attention(q, keys[i], values[i], visible=visible)

            attention = self._rotated_attention(cos_table.index_select(0, position)[None],
                                                sin_table.index_select(0, position)[None], attend)
        x = self._layers(self.embed(token), attention)
        return self.lm_head(rms_norm(x, self.norm, cfg.rms_norm_eps))

    def _fused_attention(self, caches: triton_decode.CacheAddresses, positions: torch.Tensor,
                         cos_table: torch.Tensor, sin_table: torch.Tensor) -> Attention:
        """The attention of _layers for one new token per sequence in Triton's two kernels per
        layer: RoPE and the cache write, then attention over each sequence's visible slots."""
        cfg = self.cfg

        def attention(i: int, layer: Layer, h: torch.Tensor) -> torch.Tensor:
            q = triton_decode.rotary_store(layer.qkv(h), cos_table, sin_table, positions, caches, i,
                                           cfg.num_attention_heads)
            return triton_decode.decode_attention(q, caches, i, positions, cfg.sliding_window).view(h.shape[0], 1, -1)

        return attention

    @torch.inference_mode()
    def decode_batch(self, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
        """One decode step for several sequences at once, each with its own cache and position.
        The linear layers see all rows together (weights are read once per step); attention runs
        per sequence (on a GPU with Triton, all sequences in one launch per layer). Returns logits
        [B, vocab]."""
        for cache in caches:
            cache.reserve(cache.length + 1)
        if self.decode_step is not None:
            logits = self._one_token_logits(tokens, [c.sequence_views(0) for c in caches], [c.length for c in caches])
        else:
            graphed = graphed_batch(self, caches)
            logits = graphed(tokens, caches) if graphed is not None else self._eager_batch_logits(tokens, caches)
        for cache in caches:
            cache.length += 1
        return logits[:, 0]

    def _eager_batch_logits(self, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
        """decode_batch's step in torch ops (attention in the fused kernels where they apply)
        -> logits [B, 1, vocab]; each token's keys and values land at its cache's length."""
        cfg = self.cfg
        device = self.embed.device
        x = self.embed(torch.tensor(tokens, device=device)).view(len(tokens), 1, -1)
        positions = [c.length for c in caches]
        tables = self.rotary.tables(max(positions) + 1, device) if self.fused_attention else None
        if tables is not None:
            addresses = triton_decode.CacheAddresses([c.keys for c in caches], [c.values for c in caches])
            attention = self._fused_attention(addresses, torch.tensor(positions, device=device), *tables)
        else:
            # each sequence's own angles (dynamic NTK's depend on its length)
            cos, sin = zip(*(self.rotary.cos_sin(torch.tensor([[p]], device=device)) for p in positions))
            cos, sin = torch.cat(cos), torch.cat(sin)
            groups = cfg.num_attention_heads // cfg.num_key_value_heads
            attention = self._rotated_attention(
                cos, sin, lambda i, q, k, v: _decode_attention(i, q, k, v, caches, groups, cfg.sliding_window))
        return self.lm_head(rms_norm(self._layers(x, attention), self.norm, cfg.rms_norm_eps))

    def _one_token_logits(self, tokens: list[int], views: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
                          positions: list[int]) -> torch.Tensor:
        """One token per sequence through the C++ step -> logits [B, 1, vocab]: from the ids in
        one call where the step holds the embedding, output layer and (a table of) the rotary
        rows; else the embedding and cos/sin in torch, and the output layer in the step or after."""
        step, batch, hidden = self.decode_step, len(tokens), self.cfg.hidden_size
        keys = [k for seq_keys, _ in views for k in seq_keys]
        values = [v for _, seq_values in views for v in seq_values]
        tables = self.rotary.tables(max(positions) + 1, self.embed.device) if step.takes_tokens else None
        if tables is not None:
            return step.token_logits(tokens, keys, values, positions, *tables).view(batch, 1, -1)
        x = self.embed(torch.tensor(tokens, device=self.embed.device)).reshape(batch, hidden).contiguous()
        cos, sin = self.rotary.cos_sin(torch.tensor(positions, device=self.embed.device)[:, None])
        args = (x, keys, values, positions, cos.reshape(batch, -1).contiguous(), sin.reshape(batch, -1).contiguous())
        if step.has_head:
            return step.logits(*args).view(batch, 1, -1)
        out = step(*args).view(batch, 1, hidden)
        return self.lm_head(rms_norm(out, self.norm, self.cfg.rms_norm_eps))


def _decode_attention(layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      caches: list[KVCache], groups: int, window: int | None) -> torch.Tensor:
    """One new token per sequence, each attending over its own cache: q/k/v [B, heads, 1, dim]."""
    outs = []
    for b, cache in enumerate(caches):
        pos = cache.length
        cache.keys[layer_index][:, :, pos:pos + 1] = k[b:b + 1]
        cache.values[layer_index][:, :, pos:pos + 1] = v[b:b + 1]
        outs.append(_attention(q[b:b + 1], cache.keys[layer_index][:, :, :pos + 1],
                               cache.values[layer_index][:, :, :pos + 1], pos, groups, window))
    return torch.cat(outs)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, groups: int,
               window: int | None = None) -> torch.Tensor:
    """Causal attention of new queries (positions start..) over all cached keys; with a sliding
    window, query i sees keys j with i - window < j <= i (transformers' Mistral)."""
    if q.shape[2] == 1:
        return _single_query_attention(q, k, v, window)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    seq, total = q.shape[2], k.shape[2]
    if window is not None and total > window:
        rows = torch.arange(start, start + seq, device=q.device)[:, None]
        cols = torch.arange(total, device=q.device)[None, :]
        mask = (cols <= rows) & (cols > rows - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(seq, total, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                            visible: torch.Tensor | None = None) -> torch.Tensor:
    """One new query per sequence (decode): q [B, heads, 1, dim] over k, v [B, kv_heads, L, dim].
    The query heads sharing a KV head are stacked as rows of one small matmul, so grouped-query
    caches are never copied (repeat_interleave of the whole cache cost more than the layer's
    weights on small models), and no mask is needed: a last query sees every key but those
    beyond the sliding window. With `visible` [L] (a CUDA graph's step over the whole cache) the
    hidden slots are masked instead."""
    if window is not None and k.shape[2] > window:
        k, v = k[:, :, -window:], v[:, :, -window:]
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    stacked = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(stacked, k.transpose(-1, -2)) * dim ** -0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).reshape(batch, heads, 1, dim)
