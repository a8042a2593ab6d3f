"""The SIMD kernels (csrc/: linear layers and the one-call decode step), compiled with torch's
cpp_extension on first use for the widest instruction set the CPU offers (AVX-512, else AVX2
with FMA and F16C) and cached (paths.kernel_build_dir(), keyed by a hash of the sources). On a
CPU with neither, without a C++ compiler, or with FLM_KERNELS=reference, flm runs on the
plain-PyTorch reference path."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..paths import kernel_build_dir
from ..quant import DType, Quantized, lowbit_params, round_input_int16
from ..settings import setting

log = logging.getLogger("flm")
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("linear_simd.cpp", "prefill_bf16.cpp", "decode_step.cpp", "bindings.cpp")]
# Instruction sets, widest first: (name, /proc/cpuinfo flags it needs, compiler flags).
_AVX512_NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c", "fma")
_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
ISAS = (
    ("avx512bf16", (*_AVX512_NEEDS, "avx512_vnni", "avx512_bf16"), [*_AVX512_FLAGS, "-mavx512vnni", "-mavx512bf16"]),
    ("avx512vnni", (*_AVX512_NEEDS, "avx512_vnni"), [*_AVX512_FLAGS, "-mavx512vnni"]),
    ("avx512", _AVX512_NEEDS, _AVX512_FLAGS),
    ("avx2", ("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
)
# Up to this many x rows the SIMD kernel computes from the stored weights (past 8 rows in
# cache-sized blocks: rows_blocked/rows_widened in linear_simd.cpp); beyond, the weights are
# widened a block at a time for torch's float32 GEMM (prefill_gemm). See bench/HISTORY.md for the
# crossovers (`python bench/linear_kernels.py --paths kernel gemm --rows 16 32 64 128 256 512`).
KERNEL_ROWS = 256
PREFILL_BLOCK = 256  # weight rows widened to float32 at a time for prefill GEMMs (a few MB: stays in cache)


def cpu_isa() -> tuple[str, list[str]] | None:
    """The widest instruction set of ISAS this CPU has (FLM_ISA=avx2 forces a narrower one)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    forced = setting("FLM_ISA")
    for name, needs, cflags in ISAS:
        if forced and name != forced:
            continue
        if all(f in flags for f in needs):
            return name, cflags
    return None


@dataclass(frozen=True)
class KernelBuild:
    """The kernels this machine and these sources call for: their instruction set, compiler
    flags and cache folder (a new one whenever the sources, the flags or torch change)."""

    isa: str
    flags: tuple[str, ...]
    directory: Path

    @property
    def built(self) -> bool:
        return any(self.directory.glob("*.so"))


def kernel_build() -> KernelBuild | str:
    """The build the SIMD kernels need here, or why there is none."""
    if setting("FLM_KERNELS") == "reference":
        return "FLM_KERNELS=reference"
    isa = cpu_isa()
    if isa is None:
        return "the CPU lacks AVX2/FMA/F16C"
    name, cflags = isa
    # -ffp-contract=off: the scalar ends of the tiles (y * scale + shift) round the same in every
    # template instance, so a batch's rows equal each row computed alone bit for bit (int4)
    flags = ("-O3", "-fopenmp", "-ffp-contract=off", *cflags)
    sources = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()))
    digest = hashlib.sha256(sources + " ".join(flags).encode()).hexdigest()[:10]
    return KernelBuild(name, flags, kernel_build_dir() / f"torch{torch.__version__.split('+')[0]}-{name}-{digest}")


@lru_cache(maxsize=1)
def native():
    """The compiled module, or None when the fast path is unavailable (the reason is logged)."""
    build = kernel_build()
    if isinstance(build, str):
        log.info("no SIMD kernels (%s): using the reference kernels", build)
        return None
    from torch.utils.cpp_extension import load

    build.directory.mkdir(parents=True, exist_ok=True)
    if not build.built:
        log.info("compiling the %s kernels once (about 1.5 minutes on 2 cores; cached in %s)", build.isa,
                 build.directory)
    try:
        # -fopenmp: at::parallel_for is a header template that runs serially without it; the
        # module then shares torch's own libgomp.so.1 (same soname, already loaded).
        return load(name=f"flm_kernels_{build.isa}", sources=[str(p) for p in SOURCES], extra_cflags=list(build.flags),
                    extra_ldflags=["-fopenmp"], build_directory=str(build.directory), verbose=False)
    except Exception as exc:  # no compiler, no ninja, ...: keep working on the reference path
        log.warning("could not build the %s kernels (%s); using the reference kernels", build.isa, str(exc)[:200])
        return None


def prefill_precision() -> str:
    """How prompts multiply where the CPU has AVX512-BF16: "bfloat16" (the default: x and the
    weights rounded to bf16, float32 sums, about twice as fast) or "float32" (FLM_PREFILL=float32:
    the decode kernels' arithmetic). float16 weights and other CPUs always use float32."""
    return setting("FLM_PREFILL")


# The kernels' weight kinds (csrc/kinds.h) of the stored dtypes they read.
_KIND_NAMES = {DType.BFLOAT16: "BF16", DType.FLOAT16: "FP16", DType.INT8: "INT8", DType.INT4_NOZERO: "INT4",
               DType.INT4_GROUP: "INT4", DType.FLOAT32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16",
               torch.float32: "FP32"}


def weight_kind(dtype: DType | torch.dtype):
    """The extension's Kind for weights stored as `dtype` (a .flm dtype or a torch float dtype)."""
    return getattr(native().Kind, _KIND_NAMES[dtype])


BF16_ABOVE = 8  # tokens: the decode tiles take up to 8 x rows (linear_simd.cpp, BLOCKED_ABOVE)


def prompt_in_bf16(kind, tokens: int) -> bool:
    """Whether `tokens` tokens of one sequence (a prompt, never a batch of decode steps, whose
    outputs must not depend on the batch) multiply in bfloat16 (prefill_bf16.cpp): bf16, int8
    and int4 weights (float16 ones would lose three bits per weight in bf16)."""
    module = native()
    return (tokens > BF16_ABOVE and kind in (module.Kind.BF16, module.Kind.INT8, module.Kind.INT4)
            and module.has_prefill_bf16() and prefill_precision() == "bfloat16")


class NativeParams:
    """Weight bytes and per-row/group parameters in the layout the C++ kernel reads."""

    def __init__(self, weight: torch.Tensor | Quantized, shape: tuple[int, int]):
        self.n, self.k = shape
        empty = torch.empty(0)
        self.scale, self.shift, self.group, self.groups_per_row = empty, empty, self.k, 1
        self.kind = weight_kind(weight.dtype)
        if isinstance(weight, torch.Tensor):
            self.data = weight.contiguous()
            return
        if weight.dtype in (DType.BFLOAT16, DType.FLOAT16):  # raw bytes, possibly at an odd address
            self.data = weight.data.reshape(self.n, 2 * self.k)
            return
        if weight.dtype == DType.INT8:
            scale, zero, _ = lowbit_params(weight.mins, weight.maxs, 8, no_zero=False)
            self.scale, self.shift = scale.contiguous(), ((128.0 - zero) * scale).contiguous()
            self.data = weight.data.reshape(self.n, self.k)
        else:
            scale, _, lo = lowbit_params(weight.mins, weight.maxs, 4, no_zero=True)
            self.scale, self.shift = scale.contiguous(), lo.contiguous()
            if weight.dtype == DType.INT4_GROUP:
                self.group, self.groups_per_row = weight.group_cnt, weight.group
            self.data = weight.data.reshape(self.n, self.k // 2)

    @property
    def rounds_input(self) -> bool:
        """Whether the kernel multiplies round_input_int16(x) (the int4 kinds)."""
        return self.kind == native().Kind.INT4

    @staticmethod
    def supports(weight: torch.Tensor | Quantized, shape: tuple[int, int]) -> bool:
        n, k = shape
        data = weight if isinstance(weight, torch.Tensor) else weight.data
        if k % 32 or data.device.type != "cpu":
            return False
        if isinstance(weight, torch.Tensor):
            return weight.dtype in (torch.bfloat16, torch.float16, torch.float32)
        if weight.dtype in (DType.BFLOAT16, DType.FLOAT16):
            return True
        if weight.dtype == DType.INT4_GROUP:
            return weight.group_cnt % 32 == 0 and weight.group * weight.group_cnt == k
        return weight.dtype in (DType.INT8, DType.INT4_NOZERO)

    def compatible(self, other: "NativeParams") -> bool:
        """Whether one kernel call can compute both (same kind, K and group layout)."""
        return (self.kind, self.k, self.group, self.groups_per_row) == (other.kind, other.k, other.group,
                                                                       other.groups_per_row)

    def rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start..stop of W in float32 (into `out` [stop - start, K] when given)."""
        if self.kind == native().Kind.FP32:
            return self.data[start:stop]  # already what a GEMM wants: no copy
        if out is None:
            out = torch.empty(stop - start, self.k)
        native().dequantize_rows(self.kind, self.data, self.scale, self.shift, self.group, self.groups_per_row,
                                 start, stop, self.k, out)
        return out


def kernel_args(parts: list[NativeParams]) -> tuple:
    """(kind, weights, scales, shifts, group, groups_per_row) of compatible parts, as the C++ side takes them."""
    first = parts[0]
    return (first.kind, [p.data for p in parts], [p.scale for p in parts], [p.shift for p in parts], first.group,
            first.groups_per_row)


_widen_scratch = threading.local()


def _widen_buffer(rows: int, k: int) -> torch.Tensor:
    """This thread's float32 [rows, k] buffer for widened weight blocks, reused across calls."""
    buf = getattr(_widen_scratch, "buf", None)
    if buf is None or buf.numel() < rows * k:
        buf = _widen_scratch.buf = torch.empty(rows * k)
    return buf[: rows * k].view(rows, k)


def prefill_gemm(x: torch.Tensor, parts: list[NativeParams]) -> torch.Tensor:
    """[x W1^T | x W2^T | ...] for many x rows [M, K] (a long prompt): each weight widened to
    float32 PREFILL_BLOCK rows at a time into one reused buffer, each block's GEMM written straight
    into its columns of the result: fresh blocks (page faults on every 2 MB) and a final
    concatenation were markedly slower (bench/HISTORY.md, "Figures that were in code comments")."""
    out = torch.empty(x.shape[0], sum(p.n for p in parts))
    col = 0
    for p in parts:
        as_stored = p.kind == native().Kind.FP32  # one GEMM over the weight where it lies
        for s in range(0, p.n, p.n if as_stored else PREFILL_BLOCK):
            e = p.n if as_stored else min(s + PREFILL_BLOCK, p.n)
            block = p.rows(s, e, None if as_stored else _widen_buffer(e - s, p.k))
            torch.mm(x, block.t(), out=out[:, col + s: col + e])
        col += p.n
    return out


def gemm_product(x: torch.Tensor, parts: list[NativeParams]) -> torch.Tensor:
    """prefill_gemm on x rounded as the parts' kernels would round it (int4: 16-bit grid)."""
    return prefill_gemm(round_input_int16(x) if parts[0].rounds_input else x, parts)


def linear_many(x: torch.Tensor, parts: list[NativeParams], in_bf16: bool = False, steps: bool = False) -> torch.Tensor:
    """[x W1^T | x W2^T | ...] for float32 x [M, K] in one kernel call (parts must be compatible);
    in_bf16: multiplied in bfloat16 (see prompt_in_bf16); steps: the rows are one token of each
    of M sequences, each computed as it would be alone (linear_raw in csrc/flm_kernels.h)."""
    return native().linear(x, *kernel_args(parts), [p.n for p in parts], parts[0].k, in_bf16, steps)
