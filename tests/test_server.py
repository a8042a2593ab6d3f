"""The OpenAI-compatible server, driven by the official `openai` client, raw HTTP and a browser."""

import asyncio
import json
import os
import shutil
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"
KEY = "sk-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, app, port):
        import uvicorn

        self.port = port
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_keep_alive=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def flm_model():
    from flm import llm
    from flm.builtin import smollm2_flm

    return llm.model(smollm2_flm("float32"))


@pytest.fixture(scope="module")
def server(flm_model):
    from flm.server.app import ServerConfig, create_app

    app = create_app(flm_model, ServerConfig("smollm2", api_key=KEY, max_tokens=256), max_batch=8, max_queue=8)
    running = RunningServer(app, _free_port())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, question=QUESTION, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 32)
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}], **kw)


def test_models(client, flm_model):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    assert models[0].max_model_len == flm_model.backend.window == 8192  # SmolLM2's trained window


def test_chat_completion(client):
    reply = _chat(client)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 37 and reply.usage.completion_tokens > 0


def test_streaming_equals_non_streaming(client):
    whole = _chat(client).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in _chat(client, stream=True) if c.choices]
    assert "".join(pieces) == whole


def test_completion_endpoint_and_length(client):
    reply = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0, stream=True))
    assert streamed == reply.choices[0].text


def test_stop_strings(client):
    reply = _chat(client, stop=["Paris"])
    assert reply.choices[0].message.content == "The capital of France is "
    assert reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    a = _chat(client, question="Tell me a story.", temperature=0.9, seed=7, max_tokens=12)
    b = _chat(client, question="Tell me a story.", temperature=0.9, seed=7, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_openai_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        _chat(client, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="at most 256"):
        _chat(client, max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="context window"):
        _chat(client, question="word " * 9000)
    with pytest.raises(openai.AuthenticationError):
        from openai import OpenAI

        OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": "hi"}).encode(), 400, "non-empty list"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400, "number"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode(), 400, "n=1"),
    (b"x" * (2 << 20), 413, "bytes"),
])
def test_malformed_requests(server, body, status, fragment):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert "/" not in error["message"] or "Bearer" in error["message"] or "bytes" in error["message"]


def test_unknown_route_and_method(server):
    assert httpx.get(server.url + "/v2/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/chat/completions").json()["error"]["message"].startswith("GET is not allowed")


def test_concurrent_requests_batch_and_match_alone(client, server):
    questions = [QUESTION, "What is 2+2?", "Name a color.", "What is the capital of Italy?"] * 2
    alone = {q: _chat(client, question=q, max_tokens=16).choices[0].message.content for q in set(questions)}
    scheduler = server.app.state.flm.scheduler
    steps_before = scheduler.steps

    async def run_all():
        from openai import AsyncOpenAI

        aclient = AsyncOpenAI(base_url=client.base_url, api_key=KEY, max_retries=0, timeout=120)
        replies = await asyncio.gather(*(aclient.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=16)
            for q in questions))
        return replies

    replies = asyncio.run(run_all())
    for q, reply in zip(questions, replies):
        assert reply.choices[0].message.content == alone[q]
    tokens = sum(r.usage.completion_tokens for r in replies)
    assert scheduler.steps - steps_before < tokens / 2  # sequences shared decode steps


def test_disconnect_frees_the_slot(server):
    scheduler = server.app.state.flm.scheduler
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "Write a long essay about rivers."}],
                            "max_tokens": 250, "stream": True, "temperature": 0}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and "content" in line:
                break
    deadline = time.time() + 10
    while scheduler.active and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.active == 0


def test_queue_full_is_429(flm_model):
    from flm.server.app import ServerConfig, create_app

    app = create_app(flm_model, ServerConfig("smollm2", max_tokens=256), max_batch=1, max_queue=1)
    running = RunningServer(app, _free_port())
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=120) as http:
                return await asyncio.gather(*(http.post(running.url + "/v1/completions", json={
                    "prompt": "Count to fifty:", "max_tokens": 40, "temperature": 0}) for _ in range(5)))

        codes = sorted(r.status_code for r in asyncio.run(burst()))
        assert codes.count(200) >= 2 and 429 in codes
        assert all(c in (200, 429) for c in codes)
    finally:
        running.stop()


def test_web_page_in_headless_chromium(server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("chromium/chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from flm.server.app import ServerConfig, create_app

    open_app = create_app(server.app.state.flm.model, ServerConfig("smollm2", max_tokens=256))
    running = RunningServer(open_app, _free_port())
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(running.url + "/")
        browser.find_element(By.ID, "input").send_keys(QUESTION)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 90).until(lambda b: "Paris" in b.find_element(By.CSS_SELECTOR, ".assistant").text)
        WebDriverWait(browser, 90).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".meta"))
        assert "pieces/s" in browser.find_element(By.CSS_SELECTOR, ".meta").text
    finally:
        browser.quit()
        running.stop()
