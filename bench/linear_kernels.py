"""Linear-kernel micro-benchmark: each weight type through the kernels flm picks (the SIMD
kernels on a CPU, the Triton kernels on a GPU) at decode-sized inputs (1, 4 and 8 rows), on the
1.1B model's layer shapes, against torch's float32 matmul (on a GPU also cuBLAS float16).
Prints weight bytes read per second and multiply-adds per second, to tell a bandwidth-bound
kernel from a compute-bound one.

    python bench/linear_kernels.py [--threads 2] [--rows 1 4 8] [--shapes 1024x11008 --copies 12]
    python bench/linear_kernels.py --device cuda --rows 1 8 128 [--reference] [--gemv-blocks 16x256 32x128x8]

--reference times the reference path (on a GPU: widening blocks of rows with torch ops, what
runs without Triton); --gemv-blocks compares Triton GEMV tiles (outputs x inputs [x warps]);
--paths kernel gemm times both CPU paths at every row count (the SIMD kernel on the stored
weights; widened blocks through torch's float32 GEMM), where flm picks one by KERNEL_ROWS.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from flm.bench import bandwidth_gbs, device_label, synchronize
from flm.kernels import make_linear, triton_linear
from flm.kernels.native import gemm_product, linear_many
from flm.quant import DType, Quantized, quantize

SHAPES = [(2048, 2048), (11264, 2048), (2048, 5632)]  # q/o, gate+up, down of the 1.1B model
KINDS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": (DType.INT8, 128),
         "int4": (DType.INT4_NOZERO, 128), "int4g128": (DType.INT4_GROUP, 128), "int4g32": (DType.INT4_GROUP, 32)}


def layer(kind: str, w: torch.Tensor, device: str, reference: bool):
    dtype = KINDS[kind]
    if dtype is None:
        return make_linear(w.to(device), tuple(w.shape), reference=reference), w.numel() * 4
    if isinstance(dtype, torch.dtype):
        return make_linear(w.to(device, dtype), tuple(w.shape), reference=reference), w.numel() * 2
    q = quantize(w, *dtype)
    q = Quantized(q.dtype, q.mins.to(device), q.maxs.to(device), q.data.to(device), q.group, q.group_cnt)
    return make_linear(q, tuple(w.shape), reference=reference), q.data.numel() + 4 * (q.mins.numel() + q.maxs.numel())


def _kernel_path(lin):
    return lambda x: linear_many(x, [lin.params])


def _gemm_path(lin):
    return lambda x: gemm_product(x, [lin.params])


CPU_PATHS = {"kernel": _kernel_path, "gemm": _gemm_path}


def timed(fn, device: str, seconds: float = 0.5) -> float:
    fn()
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    synchronize(device)
    return (time.perf_counter() - start) / count


def run(name: str, layers: list, weights: list[torch.Tensor], rows_list: list[int], device: str,
        copies: list[list] | None = None) -> None:
    """Time `layers` ([(callable, weight bytes)] per shape); with `copies` (further such lists),
    each call takes the next set in turn, so that the weights come from memory, not a cache."""
    sets = itertools.cycle([layers] + (copies or []))
    for rows in rows_list:
        xs = [torch.randn(rows, w.shape[1], device=device) for w in weights]
        seconds = timed(lambda: [lin(x) for (lin, _), x in zip(next(sets), xs)], device)
        nbytes = sum(b for _, b in layers)
        macs = rows * sum(w.numel() for w in weights)
        print(f"{name:<18} {rows:>4} {nbytes / seconds / 1e9:>7.1f} {macs / seconds / 1e9:>8.1f}")


def shape(spec: str) -> tuple[int, int]:
    """'2048x5632' -> (2048, 5632)."""
    outputs, inputs = (int(p) for p in spec.split("x"))
    return outputs, inputs


def gemv_block(spec: str) -> tuple[tuple[int, int], int]:
    """'16x256' or '32x128x8' -> ((outputs, inputs), warps)."""
    parts = [int(p) for p in spec.split("x")]
    return (parts[0], parts[1]), parts[2] if len(parts) > 2 else triton_linear.GEMV_WARPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--reference", action="store_true", help="time the reference path instead")
    parser.add_argument("--paths", nargs="+", choices=list(CPU_PATHS), default=[],
                        help="CPU only: time these paths at every row count instead of the one flm picks")
    parser.add_argument("--shapes", nargs="+", type=shape, default=SHAPES, metavar="NxK",
                        help="weight shapes (outputs x inputs), timed together (default: the 1.1B model's)")
    parser.add_argument("--copies", type=int, default=1,
                        help="cycle this many copies of the layers (e.g. 256 MB worth: weights from memory)")
    parser.add_argument("--gemv-blocks", nargs="+", default=[], metavar="NxK[xW]",
                        help="Triton GEMV tiles to compare (GPU only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{device_label(args.device)}, {args.threads} threads, measured read bandwidth {bandwidth_gbs(device=args.device):.1f} GB/s")
    print(f"{'kind':<18} {'rows':>4} {'GB/s':>7} {'G MAC/s':>8}")
    weights = [torch.randn(n, k) * 0.02 for n, k in args.shapes]
    if args.device.startswith("cuda"):
        halves = [w.to(args.device, torch.float16) for w in weights]
        run("cuBLAS float16", [(lambda x, h=h: F.linear(x.half(), h), h.numel() * 2) for h in halves],
            weights, args.rows, args.device)
    blocks = [gemv_block(spec) for spec in args.gemv_blocks] or [(triton_linear.GEMV_BLOCK, triton_linear.GEMV_WARPS)]
    for kind in args.kinds:
        layers = [layer(kind, w, args.device, args.reference) for w in weights]
        copies = [[layer(kind, torch.randn_like(w), args.device, args.reference) for w in weights]
                  for _ in range(args.copies - 1)]
        if args.paths:
            for path in args.paths:
                def on_path(some: list) -> list:
                    return [(CPU_PATHS[path](lin), nbytes) for lin, nbytes in some]

                run(f"{kind} {path}", on_path(layers), weights, args.rows, args.device, [on_path(c) for c in copies])
            continue
        for block, warps in blocks:
            triton_linear.GEMV_BLOCK, triton_linear.GEMV_WARPS = block, warps
            name = f"{kind} {block[0]}x{block[1]}x{warps}" if args.gemv_blocks else kind
            run(name, layers, weights, args.rows, args.device, copies)


if __name__ == "__main__":
    main()
