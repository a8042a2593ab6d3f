"""Linear-kernel micro-benchmark: each weight type through the SIMD kernels at decode-sized
inputs (1, 4 and 8 rows), on the 1.1B model's layer shapes, against torch's float32 matmul.
Prints weight bytes read per second and multiply-adds per second, to tell a bandwidth-bound
kernel from a compute-bound one.

    python bench/kernels.py [--threads 2] [--rows 1 4 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from flm.bench import bandwidth_gbs
from flm.kernels import make_linear
from flm.quant import DType, quantize

SHAPES = [(2048, 2048), (11264, 2048), (2048, 5632)]  # q/o, gate+up, down of the 1.1B model
KINDS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": (DType.INT8, 128),
         "int4": (DType.INT4_NOZERO, 128), "int4g128": (DType.INT4_GROUP, 128), "int4g32": (DType.INT4_GROUP, 32)}


def layer(kind: str, w: torch.Tensor):
    dtype = KINDS[kind]
    if dtype is None:
        return make_linear(w, tuple(w.shape)), w.numel() * 4
    if isinstance(dtype, torch.dtype):
        return make_linear(w.to(dtype), tuple(w.shape)), w.numel() * 2
    q = quantize(w, *dtype)
    return make_linear(q, tuple(w.shape)), q.data.numel() + 4 * (q.mins.numel() + q.maxs.numel())


def timed(fn, seconds: float = 0.5) -> float:
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, measured read bandwidth {bandwidth_gbs():.1f} GB/s")
    print(f"{'kind':<9} {'rows':>4} {'GB/s':>6} {'G MAC/s':>8}")
    weights = [torch.randn(n, k) * 0.02 for n, k in SHAPES]
    for kind in args.kinds:
        layers = [layer(kind, w) for w in weights]
        for rows in args.rows:
            xs = [torch.randn(rows, k) for _, k in SHAPES]
            seconds = timed(lambda: [lin(x) for (lin, _), x in zip(layers, xs)])
            nbytes = sum(b for _, b in layers)
            macs = rows * sum(w.numel() for w in weights)
            print(f"{kind:<9} {rows:>4} {nbytes / seconds / 1e9:>6.1f} {macs / seconds / 1e9:>8.1f}")


if __name__ == "__main__":
    main()
