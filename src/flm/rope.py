"""Rotary position embeddings with transformers' exact inverse frequencies for every scaling kind."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def _llama3(cfg: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    s = cfg.rope_scaling
    factor = s.factor
    low, high = s.low_freq_factor or 1.0, s.high_freq_factor or 4.0
    old_context = s.original_max_position_embeddings or 8192
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    s = cfg.rope_scaling
    factor = s.factor
    original = s.original_max_position_embeddings or cfg.max_position_embeddings
    attention_factor = s.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1
    base = cfg.rope_theta

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class Rotary:
    """cos/sin tables per position; dynamic NTK recomputes the base from the sequence length."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.dim = cfg.head_dim
        self.scale = 1.0
        kind = cfg.rope_scaling.kind
        inv = base_inv_freq(cfg.rope_theta, self.dim)
        if kind == "linear":
            inv = inv / cfg.rope_scaling.factor
        elif kind == "llama3":
            inv = _llama3(cfg, inv)
        elif kind == "yarn":
            inv, self.scale = _yarn(cfg, self.dim)
        self.inv_freq = inv
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq_for(self, seq_len: int) -> torch.Tensor:
        """transformers' dynamic NTK: past the trained length the base grows with seq_len."""
        cfg = self.cfg
        if cfg.rope_scaling.kind != "dynamic" or seq_len <= cfg.max_position_embeddings:
            return self.inv_freq
        factor = cfg.rope_scaling.factor
        base = cfg.rope_theta * ((factor * seq_len / cfg.max_position_embeddings) - (factor - 1)) ** (
            self.dim / (self.dim - 2))
        return base_inv_freq(base, self.dim)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [batch, seq, head_dim] for integer positions [batch, seq]: rows of a
        table kept per device (computing them per call is eight ops); dynamic NTK past the
        trained length computes them for that length."""
        length = int(positions.max()) + 1
        inv = self.inv_freq_for(length)
        if inv is not self.inv_freq:
            return self._computed(positions, inv.to(positions.device))
        cos, sin = self._table(length, positions.device)
        return cos[positions], sin[positions]

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin [rows >= length, head_dim] for positions 0..rows-1, or None where the
        frequencies depend on the length (dynamic NTK past the trained length)."""
        if self.inv_freq_for(length) is not self.inv_freq:
            return None
        return self._table(length, torch.device(device))

    def _computed(self, positions: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[..., None] * inv[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale

    def _table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [rows, head_dim] for positions 0..rows-1, rows a power of two >= length
        (at least 256), grown by doubling."""
        table = self._tables.get(device)
        if table is None or table[0].shape[0] < length:
            rows = 1 << max(length - 1, 255).bit_length()
            cos, sin = self._computed(torch.arange(rows, device=device)[None], self.inv_freq.to(device))
            table = self._tables[device] = (cos[0], sin[0])
        return table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; the rotate-half convention of HF checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]
