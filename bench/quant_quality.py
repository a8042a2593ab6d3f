"""Quantization quality on the real model: next-token agreement with the float32 .flm and
perplexity, over the first 256 tokens of English text every Python ships (the Zen of Python
and the json module's documentation), for every .flm dtype, with fastllm's quantizer and with `--quantizer consistent`.

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
            return m.model.forward(torch.tensor([ids[:-1]]), m.model.new_cache(1, 256), last_only=False)[0]

        ref = logits(m32)
        print(f"{'dtype':<20} {'argmax agreement':>17} {'perplexity':>11}")
        for dtype, m in models.items():
            out = logits(m)
            agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
            ppl = float(torch.exp(torch.nn.functional.cross_entropy(out, target)))
            print(f"{dtype:<20} {agree:>16.1%} {ppl:>11.2f}")


if __name__ == "__main__":
    main()
