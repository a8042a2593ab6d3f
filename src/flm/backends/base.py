"""What every backend offers: run tokens against KV caches.

A backend is one way of running the Transformer on a device. It takes two kinds of work: a
run of new tokens of one sequence (a prompt, or a few tokens to check at once) and one new
token for each of several sequences, each at its own position in its own cache (a decode step,
the server's batches). This class checks the input, makes room in the caches and advances them
once the step is done; a subclass says how the logits are computed. The reference (`Backend`
itself) runs `Transformer.forward` for both; faster backends replace the one-token step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kv_cache import KVCache
from ..model import Transformer


class BackendUnavailable(Exception):
    """This backend cannot run this model here; the message says why."""


class Backend:
    name = "torch"
    # prompt tokens per forward pass: bounds a long prompt's activations and attention scratch,
    # and lets the server step other sequences between two chunks (fastllm's chunked prefill)
    prefill_chunk = 256

    def __init__(self, model: Transformer, window: int | None = None, kv_dtype: torch.dtype = torch.float32):
        """window: the context window, the most tokens a sequence may hold (default: what the
        model's RoPE serves, ModelConfig.context_window); kv_dtype: what the KV caches store
        (one of kv_cache.KV_DTYPES)."""
        if window is not None and window < 1:
            raise ValueError(f"the context window must be at least 1 token, got {window}")
        self.model = model
        self.window = window or model.cfg.context_window
        self.kv_dtype = kv_dtype

    def new_cache(self, max_len: int | None = None, initial: int | None = None) -> KVCache:
        """An empty cache for one sequence of up to max_len tokens, never past the window."""
        return KVCache(self.model.cfg, min(max_len or self.window, self.window), self.model.device, initial,
                       self.kv_dtype)

    def prefill(self, tokens: Sequence[int], cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Logits after each of `tokens` [len, vocab] (all_logits) or after the last [vocab], the
        tokens continuing the cache's sequence."""
        if not tokens:
            raise ValueError("no tokens to run")
        self._check_ids(tokens)
        cache.reserve(cache.length + len(tokens))
        logits = self._prefill(list(tokens), cache, all_logits)
        cache.length += len(tokens)
        return logits if all_logits else logits[-1]

    def prefill_chunks(self, tokens: Sequence[int], cache: KVCache) -> torch.Tensor:
        """prefill over `prefill_chunk` tokens at a time: the logits after the last [vocab]."""
        for start in range(0, len(tokens), self.prefill_chunk):
            logits = self.prefill(tokens[start:start + self.prefill_chunk], cache)
        return logits

    def step(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> torch.Tensor:
        """Logits [B, vocab] of one new token per sequence, token b continuing caches[b]."""
        if len(tokens) != len(caches) or not tokens:
            raise ValueError(f"{len(tokens)} tokens for {len(caches)} caches")
        self._check_ids(tokens)
        for cache in caches:
            cache.reserve(cache.length + 1)
        logits = self._step(list(tokens), list(caches))
        for cache in caches:
            cache.length += 1
        return logits

    def score(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits after each token of a new sequence [len, vocab] (checks and perplexity)."""
        return self.prefill(tokens, self.new_cache(len(tokens), initial=len(tokens)), all_logits=True)

    # ------------------------------------------------------------ what subclasses replace
    def _prefill(self, tokens: list[int], cache: KVCache, all_logits: bool) -> torch.Tensor:
        """Logits [len or 1, vocab]; stores the tokens' keys and values at the cache's length."""
        return self.model.forward(torch.tensor([tokens]), [cache], last_only=not all_logits)[0]

    def _step(self, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
        """Logits [B, vocab]; stores each token's key and value at its cache's length."""
        return self.model.forward(torch.tensor(tokens)[:, None], caches)[:, 0]

    def _check_ids(self, tokens: Sequence[int]) -> None:
        vocab = self.model.cfg.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"token id outside 0..{vocab - 1}")
