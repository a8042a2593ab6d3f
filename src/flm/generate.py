"""Sampling and the decode loop, with fastllm's parameter semantics.

Greedy when `do_sample` is False or `top_k == 1` (fastllm's default top_k is 1). Otherwise the
repetition penalty (transformers' definition: divide positive logits of seen tokens, multiply
negative ones), temperature, top-k, then top-p over the renormalised top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import ContextOverflowError
from .model import Transformer


@dataclass
class SamplingConfig:
    max_length: int = 8192  # new tokens, as in fastllm
    do_sample: bool = True
    top_p: float = 0.8
    top_k: int = 1
    temperature: float = 1.0
    repeat_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.top_k == 1 or self.temperature <= 0


def apply_repeat_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def sample_next(logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig,
                generator: torch.Generator | None) -> int:
    """One token id from a [vocab] float32 logits row."""
    logits = apply_repeat_penalty(logits, seen, cfg.repeat_penalty)
    if cfg.greedy:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    top_k = cfg.top_k if cfg.top_k > 0 else logits.numel()
    values, indices = torch.topk(logits, min(top_k, logits.numel()))
    probs = torch.softmax(values, dim=-1)
    if 0 < cfg.top_p < 1:
        cumulative = torch.cumsum(probs, dim=-1)
        keep = int((cumulative < cfg.top_p).sum()) + 1  # smallest prefix whose mass exceeds top_p
        probs = probs[:keep] / probs[:keep].sum()
        indices = indices[:keep]
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(indices[choice])


def generate(model: Transformer, prompt_ids: list[int], cfg: SamplingConfig, eos_ids: set[int],
             context_limit: int | None = None) -> Iterator[int]:
    """Yield new token ids until EOS, a stop id, or `max_length` new tokens."""
    if not prompt_ids:
        raise ValueError("empty prompt: nothing to condition on")
    limit = context_limit or model.cfg.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ContextOverflowError(
            f"the prompt has {len(prompt_ids)} tokens but the context window is {limit}; shorten it or the history")
    new_tokens = min(cfg.max_length, limit - len(prompt_ids))
    cache = model.new_cache(1, len(prompt_ids) + new_tokens)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator().manual_seed(cfg.seed)
    stops = set(eos_ids) | set(cfg.stop_token_ids)
    seen = list(prompt_ids)
    logits = model.forward(torch.tensor([prompt_ids]), cache)[0, -1]
    for step in range(new_tokens):
        token = sample_next(logits, torch.tensor(sorted(set(seen))), cfg, generator)
        if token in stops:
            return
        yield token
        seen.append(token)
        if step + 1 < new_tokens:
            logits = model.forward(torch.tensor([[token]]), cache)[0, -1]
