"""Speed figures for one .flm model: prefill and decode tokens/s, time to first token, peak RSS
(and peak GPU memory on CUDA) and decode's effective weight bandwidth against the device's
measured read bandwidth. Used by `flm bench FILE.flm` and by bench/run.py (which puts peers
beside it)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class SpeedResult:
    load_s: float
    ttft_s: float
    prefill_tps: float
    decode_tps: float
    weight_bytes: int  # bytes read per decode step: every weight but the embedding table
    file_bytes: int
    baseline_rss_gb: float  # resident before loading: the interpreter with torch imported
    load_peak_rss_gb: float  # process peak right after loading (interpreter and torch included)
    first_token_rss_gb: float  # resident right after the first token (prefill done)
    kv_cache_bytes: int
    peak_rss_gb: float  # process peak over the whole run
    peak_gpu_gb: float | None = None  # torch's peak allocation on the GPU (CUDA runs only)

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work, so that a timer read after it covers that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_label(device: str | torch.device) -> str:
    """The device a figure was measured on, for every benchmark's header: the GPU's name, or the
    CPU's model and the instruction set flm's kernels were built for."""
    device = str(device)
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    from .kernels.native import cpu_isa

    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    isa = cpu_isa()
    details = ", ".join(x for x in (names[0] if names else "", isa[0] if isa else "reference kernels") if x)
    return f"{device} ({details})"


def bandwidth_gbs(gigabytes: float = 2.0, repeats: int = 5, device: str = "cpu") -> float:
    """Read bandwidth of `device`'s memory: torch sum over a `gigabytes` float32 tensor, best of
    `repeats`."""
    x = torch.ones(int(gigabytes * 1e9 / 4), dtype=torch.float32, device=device)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def _status_gb(field: str) -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def peak_rss_gb() -> float:
    """VmHWM: the peak of this process alone (ru_maxrss would include a parent's at fork)."""
    return _status_gb("VmHWM")


def peak_gpu_gb(device: str | torch.device) -> float | None:
    """torch's peak GPU allocation in this process (None off CUDA)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def rss_gb() -> float:
    return _status_gb("VmRSS")


def prompt_ids(vocab: int, n: int) -> list[int]:
    """A fixed, tokenizer-free prompt of `n` ids spread over the vocabulary."""
    return [(1000 + 37 * i) % (vocab - 100) + 50 for i in range(n)]


def decode_step_bytes(records) -> int:
    """Bytes of weights one decode step reads: all but the embedding table, of which it reads one
    row, unless the table is also the output layer (tied, as in SmolLM2), read whole every step."""
    records = list(records)
    tied = not any(r.name == "lm_head.weight" for r in records)
    return sum(r.data_nbytes for r in records if tied or r.name != "model.embed_tokens.weight")


def measure_flm(path: str, prompt: int = 128, gen: int = 64, device: str = "cpu", window: int | None = None,
                kv: str | None = None, prefill_chunk: int | None = None) -> SpeedResult:
    """Load `path`, prefill `prompt` tokens in one pass (time to first token), decode `gen` tokens
    greedily, then prefill the prompt again: prefill tokens/s is that second, steady-state pass.
    Each greedy token is read back to the host, so decode timings include the GPU's work."""
    from . import llm
    from .generate import greedy_token

    baseline = rss_gb()
    start = time.perf_counter()
    model = llm.model(path, device=device, max_context_length=window, **({"kv_cache_dtype": kv} if kv else {}))
    if prefill_chunk:
        model.set_chunked_prefill_size(prefill_chunk)
    load_s = time.perf_counter() - start
    load_peak = peak_rss_gb()
    backend = model.backend
    ids = prompt_ids(model.config.vocab_size, prompt)
    cache = backend.new_cache(prompt + gen + 1)
    start = time.perf_counter()
    token = greedy_token(backend.prefill_chunks(ids, cache))
    ttft = time.perf_counter() - start
    first_token_rss = rss_gb()
    start = time.perf_counter()
    for _ in range(gen):
        token = greedy_token(backend.step([token], [cache])[0])
    decode = time.perf_counter() - start
    synchronize(device)
    start = time.perf_counter()  # steady-state prefill: the first one also maps the weights' pages in
    backend.prefill_chunks(ids, backend.new_cache(prompt + 1))
    synchronize(device)
    prefill = time.perf_counter() - start
    weight_bytes = decode_step_bytes(model._flm.tensors.values())
    return SpeedResult(load_s=load_s, ttft_s=ttft, prefill_tps=prompt / prefill, decode_tps=gen / decode,
                       weight_bytes=weight_bytes, file_bytes=os.path.getsize(path), baseline_rss_gb=baseline,
                       load_peak_rss_gb=load_peak, first_token_rss_gb=first_token_rss,
                       kv_cache_bytes=cache.nbytes, peak_rss_gb=peak_rss_gb(), peak_gpu_gb=peak_gpu_gb(device))


def report(result: SpeedResult, bandwidth: float | None) -> str:
    """Human-readable lines for one result."""
    gbs = result.weight_bytes * result.decode_tps / 1e9
    file_gb = result.file_bytes / 1e9
    above_load = result.load_peak_rss_gb - result.baseline_rss_gb
    above_first = result.first_token_rss_gb - result.baseline_rss_gb
    lines = [
        f"load          {result.load_s:8.2f} s",
        f"prefill       {result.prefill_tps:8.1f} tok/s  (a second prompt; the first one's time to first token: "
        f"{result.ttft_s:.2f} s)",
        f"decode        {result.decode_tps:8.2f} tok/s",
        f"weights read  {gbs:8.1f} GB/s per decode step ({result.weight_bytes / 1e9:.2f} GB per token)",
        f"peak RSS      {result.peak_rss_gb:8.2f} GB",
        f"memory        {result.baseline_rss_gb:8.2f} GB before loading (interpreter, torch); above it: "
        f"{above_load:.2f} GB peak while loading ({above_load / file_gb:.2f} x the {file_gb:.2f} GB file), "
        f"{above_first:.2f} GB after the first token ({above_first / file_gb:.2f} x; KV cache "
        f"{result.kv_cache_bytes / 1e9:.3f} GB)",
    ]
    if result.peak_gpu_gb is not None:
        lines.append(f"GPU memory    {result.peak_gpu_gb:8.2f} GB peak allocated by torch")
    if bandwidth:
        lines.append(f"bandwidth     {bandwidth:8.1f} GB/s measured (torch sum over 2 GB): decode uses {gbs / bandwidth:.0%}")
    return "\n".join(lines)
