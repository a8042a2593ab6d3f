"""Serving throughput: 1, 4, 8 and 16 concurrent streaming clients against `flm serve`'s app
(continuous batching), aggregate generated tokens/s, and whether every greedy answer equals the
same prompt run alone. Two rates: end to end (all tokens over the whole run, the prompts'
prefill included) and decode (the tokens streamed while every client was past its first token,
over that window: the batched decode steps alone, since the server prefills each new prompt on
its own). The client counts run in turn, `--rounds` times (a shared VM's speed drifts by tens of
percent over minutes: one pass per count compared moments that differed), and each rate is the
median of its rounds.

    python bench/serve_bench.py                       # SmolLM2-135M-Instruct (float32)
    python bench/serve_bench.py --model llama-1.1b --dtype int4g
    python bench/serve_bench.py --model llama-1.1b --dtype float16 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = ["Tell me about rivers.", "Explain photosynthesis.", "Describe a cat.", "What is gravity?",
           "Write about the sea.", "Why is the sky blue?", "Describe a city at night.", "What are stars?"]


def start_server(path: Path, max_batch: int, device: str):
    """`flm serve` in its own process, as users run it (the clients here would otherwise share its GIL)."""
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flm", "serve", str(path), "--port", str(port), "--model-name",
                             "bench", "--max-batch", str(max_batch), "--max-tokens", "512", "--device", device],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/v1/models", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    return proc, url + "/v1/completions"


async def stream_one(http: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> tuple[str, int, list[float]]:
    """(text, completion tokens, arrival time of each streamed piece)."""
    text, count, arrivals = "", 0, []
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # ignore_eos (flm extension): every request runs full length
    async with http.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event.get("usage"):
                    count = event["usage"]["completion_tokens"]
                elif event["choices"]:
                    text += event["choices"][0]["text"]
                    arrivals.append(time.perf_counter())
    return text, count, arrivals


def decode_rate(results: list[tuple[str, int, list[float]]]) -> float:
    """Pieces streamed after the last client's first piece, per second of that window."""
    start = max(arrivals[0] for _, _, arrivals in results)
    end = max(arrivals[-1] for _, _, arrivals in results)
    pieces = sum(sum(1 for t in arrivals if t > start) for _, _, arrivals in results)
    return pieces / (end - start)


async def run_clients(url: str, clients: int, tokens: int) -> tuple[float, list[tuple[str, int, list[float]]]]:
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(http, url, PROMPTS[i % len(PROMPTS)], tokens)
                                         for i in range(clients)))
        return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "llama-1.1b"), default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the client counts (medians)")
    parser.add_argument("--device", default="cpu", help="where the server runs the model: cpu or cuda")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    from flm.builtin import smollm2_checkpoint
    from flm.paths import cache_dir
    from flm.convert import ConvertOptions, convert

    if args.model == "smollm2":
        src = smollm2_checkpoint()
    else:
        from make_models import build

        src = build(cache_dir() / "bench" / "llama-1.1b")
    path = cache_dir() / "bench" / f"{args.model}-serve-{args.dtype}.flm"
    if not path.exists():
        convert(src, path, ConvertOptions(dtype=args.dtype, group_size=32 if args.model == "smollm2" else 128,
                                          progress=False))
    server, url = start_server(path, max(args.clients), args.device)
    alone = {p: asyncio.run(run_clients_single(url, p, args.tokens)) for p in PROMPTS}
    where = "2 threads" if args.device == "cpu" else args.device
    print(f"model {args.model} {args.dtype}, {args.tokens} tokens per request, {where}, "
          f"medians of {args.rounds} rounds")
    runs: dict[int, list[tuple[float, float]]] = {clients: [] for clients in args.clients}
    same = dict.fromkeys(args.clients, True)
    for _ in range(args.rounds):
        for clients in args.clients:
            seconds, results = asyncio.run(run_clients(url, clients, args.tokens))
            runs[clients].append((sum(count for _, count, _ in results) / seconds, decode_rate(results)))
            same[clients] &= all(text == alone[PROMPTS[i % len(PROMPTS)]] for i, (text, _, _) in enumerate(results))
    print(f"{'clients':>7} {'end-to-end tok/s':>17} {'vs 1 client':>12} {'decode tok/s':>13} {'vs 1 client':>12} "
          f"{'greedy = alone':>15}")
    base = None
    for clients in args.clients:
        rates = tuple(statistics.median(rate[k] for rate in runs[clients]) for k in range(2))
        base = base or rates
        print(f"{clients:>7} {rates[0]:>17.1f} {rates[0] / base[0]:>11.2f}x {rates[1]:>13.1f} "
              f"{rates[1] / base[1]:>11.2f}x {str(same[clients]):>15}")
    server.terminate()
    server.wait()


async def run_clients_single(url: str, prompt: str, tokens: int) -> str:
    async with httpx.AsyncClient(timeout=600) as http:
        return (await stream_one(http, url, prompt, tokens))[0]


if __name__ == "__main__":
    main()
