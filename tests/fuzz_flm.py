"""Fuzzing the .flm reader: mutate a valid file and require a correct load or an FlmFormatError,
quickly and without large allocations.

    python tests/fuzz_flm.py --count 200000      # a longer run than the test suite's
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from flm.errors import FlmFormatError
from flm.format.flm import FlmWriter, VocabEntry, read_flm
from flm.quant import DType, dequantize

TIME_LIMIT_S = 1.0
MEMORY_LIMIT = 64 << 20  # bytes the parser may allocate for one file (the sample is a few KB)
EXTREMES = (0x7FFFFFFF, -1, -(1 << 31), 1 << 30, 1 << 24, 65535, 9, 100, 0)


def sample_file(directory: Path) -> bytes:
    path = directory / "sample.flm"
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    with FlmWriter(path) as writer:
        writer.write_header({"model_type": "llama", "peft_note": "x"}, [VocabEntry(b"a", 0, 0.0), VocabEntry(b"\xe4\xbd\xa0", 1, -1.0),
                                                                        VocabEntry(b"<s>", 2, 1.0)], ["<s>"])
        writer.begin_tensors(4)
        writer.write_tensor("norm", torch.randn(64), DType.FLOAT32)
        writer.write_tensor("half", w, DType.FLOAT16)
        writer.write_tensor("i8", w, DType.INT8)
        writer.write_tensor("i4g", w, DType.INT4_GROUP, 32)
    return path.read_bytes()


def mutations(blob: bytes, count: int, seed: int = 0):
    """Truncations at every offset, extreme int32s at every aligned offset, then random byte edits."""
    yielded = 0
    for cut in range(len(blob)):
        yield "truncate", blob[:cut]
        yielded += 1
    for offset in range(0, len(blob) - 3, 4):
        for value in EXTREMES:
            if yielded >= count:
                return
            yield "int32", blob[:offset] + struct.pack("<i", value) + blob[offset + 4:]
            yielded += 1
    rng = random.Random(seed)
    while yielded < count:
        data = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        yield "flip", bytes(data)
        yielded += 1


def check_one(path: Path) -> str:
    """'ok' (loaded and every tensor readable) or 'rejected' (FlmFormatError); anything else raises."""
    try:
        flm = read_flm(path)
    except FlmFormatError:
        return "rejected"
    for rec in flm.tensors.values():
        if rec.quantized:
            dequantize(flm.quantized(rec), rec.dims)
        else:
            flm.float_tensor(rec).sum()
    flm.close()
    return "ok"


def run(count: int, seed: int = 0) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        blob = sample_file(directory)
        target = directory / "mutant.flm"
        outcomes = {"ok": 0, "rejected": 0}
        slowest = 0.0
        peak = 0
        start = time.perf_counter()
        tracemalloc.start()
        for kind, data in mutations(blob, count, seed):
            target.write_bytes(data)
            tracemalloc.reset_peak()
            t0 = time.perf_counter()
            try:
                outcomes[check_one(target)] += 1
            except Exception as exc:
                raise AssertionError(f"{kind} mutant raised {type(exc).__name__}: {exc}") from exc
            elapsed = time.perf_counter() - t0
            slowest = max(slowest, elapsed)
            peak = max(peak, tracemalloc.get_traced_memory()[1])
            if elapsed > TIME_LIMIT_S:
                raise AssertionError(f"{kind} mutant took {elapsed:.2f} s")
            if peak > MEMORY_LIMIT:
                raise AssertionError(f"{kind} mutant allocated {peak} bytes")
        tracemalloc.stop()
        return {"files": sum(outcomes.values()), **outcomes, "seconds": time.perf_counter() - start,
                "slowest_s": slowest, "peak_alloc_bytes": peak}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(run(args.count, args.seed))
    sys.exit(0)
