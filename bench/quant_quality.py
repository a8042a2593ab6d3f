"""Quantization quality on the real model: next-token agreement with the float32 .flm and
perplexity, over the first 256 tokens of English text every Python ships (the Zen of Python
and the json module's documentation), for every .flm dtype, with fastllm's quantizer and with `--quantizer consistent`.
A last line runs transformers on the same tokens with every linear (the tied lm_head too)
replaced by the grid fastllm's int8 writer quantizes to, (q - 128) * absmax / 127: the figure
a simulation of fastllm's int8 formula gives on this text.

    python bench/quant_quality.py
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch

from flm import llm
from flm.builtin import smollm2_checkpoint
from flm.convert import ConvertOptions, convert
from flm.quant import quantize_int8


def english_text() -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13") + "\n\n" + json.__doc__


def main() -> None:
    src = smollm2_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        variants = [(d, "fastllm") for d in ("float32", "float16", "bfloat16", "int8", "int4", "int4g32", "int4g64")]
        variants += [(d, "consistent") for d in ("int8", "int4", "int4g32", "int4g64")]
        for dtype, quantizer in variants:
            name = dtype if quantizer == "fastllm" else f"{dtype} consistent"
            path = Path(tmp) / f"{dtype}-{quantizer}.flm"
            convert(src, path, ConvertOptions(dtype=dtype, quantizer=quantizer, progress=False))
            models[name] = llm.model(path)
        m32 = models["float32"]
        ids = m32.tokenizer.encode(english_text())[:257]
        target = torch.tensor(ids[1:])

        def logits(m):
            return m.backend.score(ids[:-1])

        ref = logits(m32)
        print(f"{'dtype':<20} {'argmax agreement':>17} {'perplexity':>11}")
        for dtype, m in models.items():
            out = logits(m)
            agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
            ppl = float(torch.exp(torch.nn.functional.cross_entropy(out, target)))
            print(f"{dtype:<20} {agree:>16.1%} {ppl:>11.2f}")
        agree, ppl = simulated_int8(src, ids)
        print(f"{'int8 simulated (HF)':<20} {agree:>16.1%} {ppl:>11.2f}")


@torch.no_grad()
def simulated_int8(src: Path, ids: list[int]) -> tuple[float, float]:
    """transformers with every linear on fastllm's int8 writer grid: (agreement, perplexity)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    x, target = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    ref = model(x).logits[0]
    for module in list(model.modules()):
        if isinstance(module, torch.nn.Linear):
            q = quantize_int8(module.weight.data)
            grid = (q.data.float() - 128.0) * (q.maxs / 127.0)[:, None]
            module.weight = torch.nn.Parameter(grid)  # a new tensor: unties lm_head from the embedding
    out = model(x).logits[0]
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    return agree, float(torch.exp(torch.nn.functional.cross_entropy(out, target)))


if __name__ == "__main__":
    main()
