"""Side-by-side speed benchmark: flm, transformers and (when installed) llama.cpp through
llama-cpp-python, each engine in its own child process (for a clean peak RSS), alternately.

    python bench/run.py                      # the 1.1B LLaMA, every dtype, 2 threads
    python bench/run.py --model smollm2      # SmolLM2-135M-Instruct
    python bench/run.py --engines flm --dtypes int4g
    python bench/run.py --device cuda        # flm's CUDA path beside transformers on the same GPU
    python bench/run.py --model smollm2 --engines flm llama.cpp --rounds 3   # medians of 3 rounds
    python bench/run.py --engines flm --baseline ../old/src --rounds 4       # A/B against another flm tree

Prints prefill and decode tokens/s, time to first token, peak RSS, decode effective GB/s against
the measured memory bandwidth (the GPU's with --device cuda, where peak GPU memory is added and
transformers float16 is float16's peer), and the ratios of flm to each peer. --baseline SRC adds
"baseline DTYPE": the flm package found in SRC (another checkout's src/, e.g. a worktree of the
commit before a change) on the same files, alternating with this tree's. Every engine is timed alike:
time to first token is its first prompt after loading; prefill tokens/s is the same prompt run
again after decoding (steady state: no first-touch of weight pages or one-time set-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from flm.bench import bandwidth_gbs, device_label, measure_flm, peak_gpu_gb, peak_rss_gb, prompt_ids, synchronize  # noqa: E402

FLM_DTYPES = ("float16", "bfloat16", "int8", "int4", "int4g")
# llama.cpp's type of the same kind: int4g (a scale and a minimum per group) meets Q4_1 (the same
# per 32 weights), per-row int4 meets Q4_0 (the peer for fastllm's int4)
GGUF_PEER = {"float16": "F16", "bfloat16": "F16", "int8": "Q8_0", "int4": "Q4_0", "int4g": "Q4_1"}


# ------------------------------------------------------------------ engines (run in a child)

def run_flm(path: str, prompt: int, gen: int, device: str) -> dict:
    return measure_flm(path, prompt, gen, device).as_dict()


def run_transformers(model_dir: str, dtype: str, prompt: int, gen: int, device: str) -> dict:
    """transformers' own forward with its KV cache, greedy, each token read back to the host as
    flm's bench does."""
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    synchronize(device)
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt_ids(model.config.vocab_size, prompt)], device=device)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - start
        past = out.past_key_values
        start = time.perf_counter()
        for _ in range(gen):
            out = model(torch.tensor([[token]], device=device), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        decode = time.perf_counter() - start
        synchronize(device)
        start = time.perf_counter()
        model(ids, use_cache=True)
        synchronize(device)
        prefill = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return {"load_s": load_s, "ttft_s": ttft, "prefill_tps": prompt / prefill, "decode_tps": gen / decode,
            "weight_bytes": weight_bytes, "peak_gpu_gb": peak_gpu_gb(device)}


def run_llamacpp(gguf: str, prompt: int, gen: int, threads: int) -> dict:
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=prompt + gen + 8, n_threads=threads, n_threads_batch=threads,
                          n_batch=prompt + gen + 8, verbose=False)
    load_s = time.perf_counter() - start
    ids = prompt_ids(llm.n_vocab(), prompt)
    start = time.perf_counter()
    llm.eval(ids)
    ttft = time.perf_counter() - start
    token = int(llm.scores[llm.n_tokens - 1].argmax())
    start = time.perf_counter()
    for _ in range(gen):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
    decode = time.perf_counter() - start
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    return {"load_s": load_s, "ttft_s": ttft, "prefill_tps": prompt / prefill, "decode_tps": gen / decode,
            "weight_bytes": os.path.getsize(gguf)}


def child_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.engine == "flm":
        result = run_flm(args.path, args.prompt, args.gen, args.device)
    elif args.engine == "transformers":
        result = run_transformers(args.path, args.dtype, args.prompt, args.gen, args.device)
    else:
        result = run_llamacpp(args.path, args.prompt, args.gen, args.threads)
    result["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result))


def in_child(engine: str, path: str, dtype: str, args: argparse.Namespace, flm_src: str | None = None) -> dict | None:
    """One engine's run in a fresh process; flm_src: import flm from there instead."""
    cmd = [sys.executable, __file__, "--child", engine, "--path", str(path), "--dtype", dtype, "--prompt",
           str(args.prompt), "--gen", str(args.gen), "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if flm_src:
        env["PYTHONPATH"] = os.pathsep.join([flm_src] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  {engine} {dtype} failed: {proc.stderr.strip()[-400:]}", file=sys.stderr)
    return None


# ------------------------------------------------------------------ models

def prepare(args: argparse.Namespace) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """(HF checkpoint, flm files per dtype, gguf files per llama.cpp type)."""
    from flm.builtin import smollm2_checkpoint
    from flm.paths import cache_dir
    from flm.convert import ConvertOptions, convert

    if args.model == "smollm2":
        src = smollm2_checkpoint()
        group = 32
    else:
        from make_models import build

        src = build(cache_dir() / "bench" / "llama-1.1b")
        group = 128
    out = cache_dir() / "bench" / f"{args.model}-flm"
    out.mkdir(parents=True, exist_ok=True)
    flm_files = {}
    for dtype in args.dtypes:
        flm_files[dtype] = out / f"{dtype}.flm"
        if not flm_files[dtype].exists():
            convert(src, flm_files[dtype], ConvertOptions(dtype=dtype, group_size=group, progress=False))
    gguf_files = {}
    if "llama.cpp" in args.engines:
        from gguf_models import gguf_for

        for dtype in args.dtypes:
            kind = GGUF_PEER[dtype]
            try:
                gguf_files[kind] = gguf_for(src, kind, cache_dir() / "bench" / f"{args.model}-gguf")
            except Exception as exc:  # llama-cpp-python missing or unable to convert
                print(f"llama.cpp: skipped ({exc})", file=sys.stderr)
                args.engines = [e for e in args.engines if e != "llama.cpp"]
                break
    return src, flm_files, gguf_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llama-1.1b", "smollm2"), default="llama-1.1b")
    parser.add_argument("--dtypes", nargs="+", default=list(FLM_DTYPES), choices=FLM_DTYPES)
    parser.add_argument("--engines", nargs="+", default=["flm", "transformers", "llama.cpp"])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: flm and transformers on the GPU")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each dtype's engines alternately this many times and report medians (a shared "
                             "machine's slow phases last minutes and move single runs up to 2x)")
    parser.add_argument("--baseline", metavar="SRC", help="also time the flm package in SRC (another tree's src/) "
                                                           "on the same files, alternating with this one")
    parser.add_argument("--child", choices=("flm", "transformers", "llama.cpp"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.child:
        args.engine = args.child
        child_main(args)
        return
    if "llama.cpp" in args.engines and args.device != "cpu":
        print("llama.cpp: llama-cpp-python's CPU build is not a GPU peer; comparing the rest", file=sys.stderr)
        args.engines = [e for e in args.engines if e != "llama.cpp"]
    if "llama.cpp" in args.engines:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp: llama-cpp-python is not installed; comparing the rest", file=sys.stderr)
            args.engines = [e for e in args.engines if e != "llama.cpp"]
    bandwidth = bandwidth_gbs(device=args.device)
    src, flm_files, gguf_files = prepare(args)
    print(f"model {args.model}, device {device_label(args.device)}, {args.threads} threads, prompt {args.prompt}, "
          f"generate {args.gen}, measured read bandwidth {bandwidth:.1f} GB/s")
    rows = measure_all(args, src, flm_files, gguf_files)
    report(rows, bandwidth, gpu=args.device != "cpu", rounds=args.rounds)


def peer_runs(dtype: str, args: argparse.Namespace, src: Path, flm_files: dict[str, Path],
              gguf_files: dict[str, Path]) -> list[tuple[str, str, str, str, str | None]]:
    """(label, engine, path, engine's dtype, flm source) of this dtype's peers: the baseline flm
    tree on the same file; llama.cpp at its GGUF type; transformers bf16 for every dtype, and on a
    GPU fp16 for float16 (a CPU has no float16 matrix units: there it is no real peer)."""
    out = []
    if args.baseline:
        out.append((f"baseline {dtype}", "flm", str(flm_files[dtype]), dtype, str(Path(args.baseline).resolve())))
    kind = GGUF_PEER[dtype]
    if "llama.cpp" in args.engines and kind in gguf_files:
        out.append((f"llama.cpp {kind}", "llama.cpp", str(gguf_files[kind]), kind, None))
    if "transformers" in args.engines:
        hf_dtype = "fp16" if args.device != "cpu" and dtype == "float16" else "bf16"
        out.append((f"transformers {hf_dtype}", "transformers", str(src), hf_dtype, None))
    return out


def measure_all(args: argparse.Namespace, src: Path, flm_files: dict[str, Path],
                gguf_files: dict[str, Path]) -> list[tuple[str, list, dict[str, list]]]:
    """Per dtype: flm's runs and each peer's, alternating flm, peers, flm, peers ... for --rounds
    rounds, so that slow phases of a shared machine fall on every engine alike. With one round a
    peer shared by two dtypes (llama.cpp F16 for float16 and bfloat16) runs once."""
    rows = []
    once: dict[str, dict | None] = {}
    for dtype in args.dtypes:
        peers = peer_runs(dtype, args, src, flm_files, gguf_files)
        flm_results: list = []
        peer_results: dict[str, list] = {label: [] for label, *_ in peers}
        for round_no in range(args.rounds):
            flm_results.append(in_child("flm", str(flm_files[dtype]), dtype, args))
            for label, engine, path, peer_dtype, flm_src in peers:
                if args.rounds == 1 and not flm_src:
                    once.setdefault(label, in_child(engine, path, peer_dtype, args))
                    peer_results[label].append(once[label])
                else:
                    peer_results[label].append(in_child(engine, path, peer_dtype, args, flm_src))
            if args.rounds > 1:  # each round as it ends: the medians come at the end
                done = [(f"flm {dtype}", flm_results[-1])] + [(label, runs[-1]) for label, runs in peer_results.items()]
                print(f"  round {round_no + 1}: " + ", ".join(
                    f"{label} {r['prefill_tps']:.1f}/{r['decode_tps']:.2f}" for label, r in done if r)
                      + " (prefill/decode tok/s)", flush=True)
        rows.append((dtype, flm_results, peer_results))
    return rows


def median_result(results: list) -> dict | None:
    """Each figure's median over the runs that finished (None when none did)."""
    done = [r for r in results if r]
    if not done:
        return None
    return {key: median([r[key] for r in done]) if isinstance(value, (int, float)) else value
            for key, value in done[0].items()}


def report(rows: list, bandwidth: float, gpu: bool, rounds: int) -> None:
    if rounds > 1:
        print(f"medians of {rounds} alternating rounds")
    print(f"{'engine':<24} {'prefill tok/s':>13} {'decode tok/s':>12} {'TTFT s':>7} {'peak RSS GB':>11} "
          f"{'decode GB/s':>11} {'% of bw':>7}" + (f" {'GPU GB':>7}" if gpu else ""))
    seen = set()
    for dtype, flm, peers in rows:
        for name, results in [(f"flm {dtype}", flm)] + list(peers.items()):
            result = median_result(results)
            if result is None or (rounds == 1 and name in seen):
                continue
            seen.add(name)
            gbs = result["weight_bytes"] * result["decode_tps"] / 1e9
            print(f"{name:<24} {result['prefill_tps']:>13.1f} {result['decode_tps']:>12.2f} {result['ttft_s']:>7.2f} "
                  f"{result['peak_rss_gb']:>11.2f} {gbs:>11.1f} {gbs / bandwidth:>7.0%}"
                  + (f" {result['peak_gpu_gb']:>7.2f}" if gpu else ""))
    print("\nratios (flm / peer): prefill, decode" + (" (median of the rounds' ratios, lowest-highest)" if rounds > 1 else ""))
    for dtype, flm, peers in rows:
        for name, results in peers.items():
            pairs = [(f, r) for f, r in zip(flm, results) if f and r]
            if not pairs:
                continue
            line = f"  flm {dtype:<9} vs {name:<20}"
            for key in ("prefill_tps", "decode_tps"):
                ratios = [f[key] / r[key] for f, r in pairs]
                line += f" {median(ratios):>5.2f}x"
                if rounds > 1:
                    line += f" ({min(ratios):.2f}-{max(ratios):.2f})"
            print(line)


if __name__ == "__main__":
    main()
