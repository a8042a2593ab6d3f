"""Sampling and the decode loop, with fastllm's parameter semantics.

Greedy when `do_sample` is False or `top_k == 1` (fastllm's default top_k is 1). Otherwise the
repetition penalty (transformers' definition: divide positive logits of seen tokens, multiply
negative ones), temperature, top-k, then top-p over the renormalised top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .backends import Backend
from .errors import ContextOverflowError


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


NO_TOKENS = torch.empty(0, dtype=torch.long)  # what a repeat penalty of 1.0 needs to know


def greedy_token(logits: torch.Tensor) -> int:
    """The index of the largest logit (the first of equals, as torch.argmax). On the CPU through
    numpy, whose argmax is several times faster than torch's over a vocabulary row."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return int(logits.numpy().argmax())
    return int(torch.argmax(logits))


def sample_next(logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig,
                generator: torch.Generator | None) -> int:
    """One token id from a [vocab] float32 logits row."""
    logits = apply_repeat_penalty(logits, seen, cfg.repeat_penalty)
    if cfg.greedy:
        return greedy_token(logits)
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


class Sequence:
    """One generation in progress: its cache, sampling state and stopping rules. `generate`
    drives one alone; the server's scheduler steps many together."""

    def __init__(self, backend: Backend, prompt_ids: list[int], cfg: SamplingConfig, eos_ids: set[int],
                 context_limit: int | None = None):
        if not prompt_ids:
            raise ValueError("empty prompt: nothing to condition on")
        limit = min(context_limit or backend.window, backend.window)
        if len(prompt_ids) >= limit:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens but the context window is {limit}; shorten it or the history")
        self.backend = backend
        self.prompt_ids = list(prompt_ids)
        self.cfg = cfg
        self.stops = set(eos_ids) | set(cfg.stop_token_ids)
        self.remaining = min(cfg.max_length, limit - len(prompt_ids))
        needed = len(prompt_ids) + self.remaining
        # exactly what this generation can use, up to a first chunk; it grows only for long answers
        self.cache = backend.new_cache(needed, initial=min(needed, len(prompt_ids) + 256))
        self.generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        self.seen = set(prompt_ids)
        self.output: list[int] = []
        self.finish_reason: str | None = None  # "stop" or "length" once done
        self.prefilled = 0  # prompt tokens in the cache

    def prefill_chunk(self) -> torch.Tensor | None:
        """Run the prompt's next `backend.prefill_chunk` tokens: the logits after its last token
        once the whole prompt is in the cache, else None."""
        part = self.prompt_ids[self.prefilled:self.prefilled + self.backend.prefill_chunk]
        logits = self.backend.prefill(part, self.cache)
        self.prefilled += len(part)
        return logits if self.prefilled == len(self.prompt_ids) else None

    def prefill(self) -> torch.Tensor:
        """The rest of the prompt, chunk after chunk: the logits after its last token."""
        logits = self.backend.prefill_chunks(self.prompt_ids[self.prefilled:], self.cache)
        self.prefilled = len(self.prompt_ids)
        return logits

    def choose(self, logits: torch.Tensor) -> int | None:
        """The next token from `logits`, or None when the sequence stops here."""
        seen = torch.tensor(sorted(self.seen)) if self.cfg.repeat_penalty != 1.0 else NO_TOKENS
        token = sample_next(logits.float().cpu(), seen, self.cfg, self.generator)
        if token in self.stops:
            self.finish_reason = "stop"
            return None
        self.output.append(token)
        self.seen.add(token)
        self.remaining -= 1
        if self.remaining <= 0:
            self.finish_reason = "length"
        return token

    def step(self, token: int) -> torch.Tensor:
        return self.backend.step([token], [self.cache])[0]


def generate(backend: Backend, prompt_ids: list[int], cfg: SamplingConfig, eos_ids: set[int],
             context_limit: int | None = None) -> Iterator[int]:
    """Yield new token ids until EOS, a stop id, or `max_length` new tokens."""
    seq = Sequence(backend, prompt_ids, cfg, eos_ids, context_limit)
    logits = seq.prefill()
    while seq.finish_reason is None:
        token = seq.choose(logits)
        if token is None:
            return
        yield token
        if seq.finish_reason is None:
            logits = seq.step(token)
