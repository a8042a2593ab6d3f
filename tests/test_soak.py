"""Soak: a few hundred mixed requests (good, streaming, bad) from 32 concurrent clients on the
loopback interface. Every good request must get its full, correct answer; memory must come back
near its baseline; no KV-cache slot may leak."""

import asyncio
import gc
import json
import random
import statistics
import time

import httpx
import pytest

from test_server import RunningServer, _free_port

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "What is 2+2?", "Name a color.", "Say hello.",
             "What is the capital of Italy?"]
REQUESTS = 240
CLIENTS = 32


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _body(question: str, **extra) -> dict:
    return {"model": "smollm2", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 12, **extra}


async def _one(http: httpx.AsyncClient, url: str, kind: str, question: str) -> tuple[str, int, str, float]:
    start = time.perf_counter()
    if kind == "bad-json":
        r = await http.post(url, content=b"{broken", headers={"Content-Type": "application/json"})
        return kind, r.status_code, "", time.perf_counter() - start
    if kind == "wrong-model":
        r = await http.post(url, json={**_body(question), "model": "nope"})
        return kind, r.status_code, "", time.perf_counter() - start
    if kind == "zero-tokens":
        r = await http.post(url, json=_body(question, max_tokens=0))
        return kind, r.status_code, "", time.perf_counter() - start
    if kind == "stream":
        text, status = "", 0
        async with http.stream("POST", url, json=_body(question, stream=True)) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    text += delta or ""
        return kind, status, text, time.perf_counter() - start
    r = await http.post(url, json=_body(question))
    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
    return kind, r.status_code, text, time.perf_counter() - start


def test_soak(capsys):
    from flm import llm
    from flm.builtin import smollm2_flm
    from flm.server.app import ServerConfig, create_app

    model = llm.model(smollm2_flm("float32"))
    app = create_app(model, ServerConfig("smollm2", max_tokens=64), max_batch=16, max_queue=64)
    running = RunningServer(app, _free_port())
    url = running.url + "/v1/chat/completions"
    rng = random.Random(0)
    kinds = rng.choices(["good", "stream", "bad-json", "wrong-model", "zero-tokens"], [70, 10, 10, 5, 5], k=REQUESTS)
    plan = [(kind, rng.choice(QUESTIONS)) for kind in kinds]
    try:
        reference = {q: httpx.post(url, json=_body(q), timeout=60).json()["choices"][0]["message"]["content"]
                     for q in QUESTIONS}
        gc.collect()
        baseline = _rss_mb()

        async def soak():
            queue = asyncio.Queue()
            for item in plan:
                queue.put_nowait(item)
            results = []
            async with httpx.AsyncClient(timeout=300) as http:
                async def client():
                    while not queue.empty():
                        kind, question = queue.get_nowait()
                        results.append((question, *await _one(http, url, kind, question)))
                await asyncio.gather(*(client() for _ in range(CLIENTS)))
            return results

        asyncio.run(soak())  # warm-up round: allocator arenas and GEMM workspaces reach their steady size
        scheduler = running.app.state.flm.scheduler
        while scheduler.active:
            time.sleep(0.05)
        time.sleep(1.0)
        gc.collect()
        warm = _rss_mb()
        start = time.perf_counter()
        results = asyncio.run(soak())
        elapsed = time.perf_counter() - start
        scheduler = running.app.state.flm.scheduler
        deadline = time.time() + 5
        while scheduler.active and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the idle scheduler hands freed KV memory back
        gc.collect()
        after = _rss_mb()
    finally:
        running.stop()

    expected_status = {"good": 200, "stream": 200, "bad-json": 400, "wrong-model": 404, "zero-tokens": 400}
    wrong = [(q, kind, status, text) for q, kind, status, text, _ in results
             if status != expected_status[kind] or (kind in ("good", "stream") and text != reference[q])]
    latencies = sorted(t for _, kind, _, _, t in results if kind in ("good", "stream"))
    by_kind = {k: sum(1 for _, kind, _, _, _ in results if kind == k) for k in expected_status}
    report = {"requests": len(results), "by_kind": by_kind, "wrong": len(wrong), "seconds": round(elapsed, 1),
              "p50_s": round(statistics.median(latencies), 3),
              "p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
              "rss_mb_idle": round(baseline), "rss_mb_after_warmup_round": round(warm),
              "rss_mb_after": round(after), "slots_left": scheduler.active}
    with capsys.disabled():
        print(f"\nsoak: {report}")
    assert len(results) == REQUESTS
    assert not wrong, wrong[:3]
    assert scheduler.active == 0 and not scheduler.running
    assert after - warm < 100, report  # steady state: a second round does not grow memory
