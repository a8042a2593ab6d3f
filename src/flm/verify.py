"""`flm verify MODEL_DIR FILE.flm`: does a converted file behave like its source checkpoint?

Runs transformers on the checkpoint (where it has the architecture; otherwise flm's own float32
conversion stands in, and the report says so) and flm on the file, over a few prompts: the
largest logit difference relative to the logit range, greedy agreement, and a verdict.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .quant import FLOAT_DTYPES

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "人工智能是",
    "Once upon a time, there was a little",
)
FLOAT_TOLERANCE = 1e-2  # relative max logit difference accepted for float32/16 files


@dataclass
class PromptResult:
    prompt: str
    max_rel_diff: float
    greedy_match: int  # leading greedy tokens that agree
    greedy_total: int


@dataclass
class VerifyReport:
    reference: str
    quantized: bool
    results: list[PromptResult] = field(default_factory=list)

    @property
    def worst_diff(self) -> float:
        return max((r.max_rel_diff for r in self.results), default=0.0)

    @property
    def greedy_agreement(self) -> float:
        total = sum(r.greedy_total for r in self.results)
        return sum(r.greedy_match for r in self.results) / total if total else 1.0

    @property
    def verdict(self) -> str:
        if self.quantized:
            return (f"QUANTIZED: greedy agreement {self.greedy_agreement:.0%}, "
                    f"max logit difference {self.worst_diff:.2%} of the logit range")
        ok = self.worst_diff <= FLOAT_TOLERANCE and self.greedy_agreement == 1.0
        return "MATCH" if ok else "MISMATCH: the file does not reproduce the checkpoint"

    def table(self) -> str:
        lines = [f"reference: {self.reference}",
                 f"{'prompt':<32} {'max |dlogit| / range':>21} {'greedy agreement':>17}"]
        for r in self.results:
            lines.append(f"{r.prompt[:30]!r:<32} {r.max_rel_diff:>21.2e} {r.greedy_match:>8}/{r.greedy_total:<8}")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _greedy(step: Callable[[list[int]], torch.Tensor], ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(step(ids + out)[-1].argmax()))
    return out


def verify(model_dir: str | Path, flm_path: str | Path, new_tokens: int = 8,
           prompts: tuple[str, ...] = PROMPTS) -> VerifyReport:
    from . import llm

    model = llm.model(flm_path)
    quantized = any(rec.dtype not in FLOAT_DTYPES for rec in model._flm.tensors.values())

    def ours(ids: list[int]) -> torch.Tensor:
        return model.backend.score(ids)

    reference_name, theirs, keep = _reference(Path(model_dir))
    report = VerifyReport(reference_name, quantized)
    bos = model.config.bos_token_id
    for prompt in prompts:
        ids = ([bos] if bos is not None else []) + model.tokenizer_encode_string(prompt)
        a, b = ours(ids), theirs(ids)
        rel = float((a - b).abs().max() / (b.max() - b.min()).clamp_min(1e-9))
        mine, ref = _greedy(ours, ids, new_tokens), _greedy(theirs, ids, new_tokens)
        match = next((i for i, (x, y) in enumerate(zip(mine, ref)) if x != y), len(ref))
        report.results.append(PromptResult(prompt, rel, match, len(ref)))
    del keep
    return report


def _reference(model_dir: Path):
    """(description, logits function, objects to keep alive) for the checkpoint."""
    try:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except Exception as exc:  # transformers lacks the architecture, or is not installed
        from . import llm
        from .convert import ConvertOptions, convert

        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "reference.flm"
        convert(model_dir, path, ConvertOptions(dtype="float32", progress=False))
        ref = llm.model(path)

        def run(ids: list[int]) -> torch.Tensor:
            return ref.backend.score(ids)

        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return f"flm float32 conversion of {model_dir} (transformers could not load it: {reason})", run, (tmp, ref)

    def run_hf(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].float()

    return f"transformers {type(hf).__name__} (float32) from {model_dir}", run_hf, hf
