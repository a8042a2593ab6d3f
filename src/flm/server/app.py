"""OpenAI-compatible HTTP API (and the chat page at /) over one flm model.

Every request body is untrusted: size-limited, parsed by hand, and every problem answered with
OpenAI's error shape and a 4xx status. Paths and stack traces never reach a client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ContextOverflowError, FlmError
from ..generate import SamplingConfig, Sequence
from ..tokenization.tokenizer import StreamDecoder
from .scheduler import Job, QueueFull, Scheduler

STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 512


# ---------------------------------------------------------------- request parsing

def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return float(value)


def _sampling(body: dict, cfg: ServerConfig) -> tuple[SamplingConfig, list[str]]:
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, cfg.max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ApiError(400, "'max_tokens' must be an integer", param="max_tokens")
    if max_tokens <= 0:
        raise ApiError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > cfg.max_tokens:
        raise ApiError(400, f"'max_tokens' is {max_tokens}; this server allows at most {cfg.max_tokens}",
                       param="max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    greedy = temperature == 0.0
    sampling = SamplingConfig(max_length=max_tokens, do_sample=not greedy, top_p=top_p if top_p > 0 else 1.0,
                              top_k=1 if greedy else 0, temperature=temperature if not greedy else 1.0, seed=seed)
    return sampling, stop


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": message["role"], "content": content})
    return out


# ---------------------------------------------------------------- generation bridge

class Mailbox:
    """Tokens from the model thread to the event loop, with one loop wake-up per batch of tokens
    instead of one per token (each wake-up costs the model thread a GIL hand-over)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, target: asyncio.Queue, item: tuple) -> None:
        with self.lock:
            self.items.append((target, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, collections.deque()
            self.scheduled = False
        for target, item in items:
            target.put_nowait(item)


class Generation:
    """Runs one request through the scheduler and turns its tokens into text, honouring stop strings."""

    def __init__(self, app_state: "State", prompt_ids: list[int], sampling: SamplingConfig, stop: list[str],
                 ignore_eos: bool = False):
        self.state = app_state
        self.prompt_tokens = len(prompt_ids)
        self.stop = stop
        if app_state.mailbox is None:
            app_state.mailbox = Mailbox(asyncio.get_running_loop())
        self.mailbox = app_state.mailbox
        self.queue: asyncio.Queue = asyncio.Queue()
        try:
            eos = set() if ignore_eos else app_state.model.eos_ids
            sequence = Sequence(app_state.model.backend, prompt_ids, sampling, eos)
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded", param="messages") from None
        self.job = Job(sequence, self._emit)
        self.decoder = StreamDecoder(app_state.model.tokenizer)
        self.completion_tokens = 0
        self.finish_reason = "stop"
        try:
            app_state.scheduler.submit(self.job)
        except QueueFull:
            raise ApiError(429, "the server is busy: too many requests are running and waiting; retry later",
                           kind="rate_limit_error", code="server_busy") from None

    def _emit(self, token: int | None, reason: str | None) -> None:
        self.mailbox.post(self.queue, (token, reason))

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces; stop strings are cut, and text that may start one is held back."""
        text, sent = "", 0
        hold = max((len(s) for s in self.stop), default=1) - 1
        try:
            while True:
                token, reason = await self.queue.get()
                if token is None:
                    self.finish_reason = "length" if reason == "length" else "stop"
                    if reason and reason.startswith("error"):
                        raise ApiError(500, "generation failed", kind="server_error")
                    break
                self.completion_tokens += 1
                text += self.decoder.push(token)
                cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    self.finish_reason = "stop"
                    self.job.cancel()
                    break
                safe = len(text) - hold if self.stop else len(text)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            if len(text) > sent:
                yield text[sent:]
        finally:
            self.job.cancel()  # a client that went away frees its slot at the next step


@dataclass
class State:
    model: Any
    scheduler: Scheduler
    config: ServerConfig
    mailbox: Mailbox | None = None


# ---------------------------------------------------------------- endpoints

def create_app(model: Any, config: ServerConfig, max_batch: int = 8, max_queue: int = 32,
               background_scheduler: bool = True) -> Starlette:
    """The ASGI app. With background_scheduler=False the caller runs `app.state.flm.scheduler.run()`
    itself (on the main thread, as `flm serve` does)."""
    scheduler = Scheduler(model.backend, max_batch=max_batch, max_queue=max_queue)
    state = State(model, scheduler, config)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           kind="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        check_key(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"request body over {config.max_body_bytes} bytes")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > config.max_body_bytes:
                    raise ApiError(413, f"request body over {config.max_body_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "client disconnected") from None
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        requested = body.get("model")
        if requested is not None and requested != config.model_name:
            raise ApiError(404, f"model {requested!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")
        return body

    def handler(fn):
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as exc:
                return exc.response()
            except FlmError as exc:
                return ApiError(400, str(exc).split(": ", 1)[-1]).response()
        return wrapped

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": int(time.time()), "owned_by": "flm",
             "max_model_len": model.backend.window}]})

    async def complete(request: Request, chat: bool) -> Response:
        body = await read_json(request)
        sampling, stop = _sampling(body, config)
        if chat:
            prompt = model.prompt_for_messages(_messages(body))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        ids = model.encode_prompt(prompt)
        gen = Generation(state, ids, sampling, stop, ignore_eos=body.get("ignore_eos") is True)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                    "total_tokens": gen.prompt_tokens + gen.completion_tokens}

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(delta: dict | str, finish: str | None) -> str:
                choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat
                          else {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None})
                return "data: " + json.dumps({"id": rid, "object": kind + ".chunk" if chat else kind,
                                              "created": created, "model": config.model_name,
                                              "choices": [choice]}) + "\n\n"

            async def events() -> AsyncIterator[str]:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None)
                async for piece in gen.pieces():
                    yield chunk({"content": piece} if chat else piece, None)
                yield chunk({} if chat else "", gen.finish_reason)
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": kind + ".chunk" if chat else kind,
                                                  "created": created, "model": config.model_name, "choices": [],
                                                  "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        text = ""
        pieces = gen.pieces()
        try:
            while True:
                next_piece = asyncio.ensure_future(pieces.__anext__())
                while not next_piece.done():
                    await asyncio.wait({next_piece}, timeout=0.5)
                    if not next_piece.done() and await request.is_disconnected():
                        next_piece.cancel()
                        gen.job.cancel()
                        return Response(status_code=499)
                try:
                    text += next_piece.result()
                except StopAsyncIteration:
                    break
        finally:
            await pieces.aclose()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": gen.finish_reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": gen.finish_reason, "logprobs": None}
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": config.model_name,
                             "choices": [choice], "usage": usage()})

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def page(request: Request) -> Response:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8").replace("{{MODEL}}", config.model_name))

    async def not_found(request: Request, exc: Exception) -> Response:
        return ApiError(404, f"no route {request.url.path}", code="not_found").response()

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    async def server_error(request: Request, exc: Exception) -> Response:
        return ApiError(500, "internal error", kind="server_error").response()

    routes = [
        Route("/", page),
        Route("/v1/models", handler(models)),
        Route("/v1/chat/completions", handler(chat_completions), methods=["POST"]),
        Route("/v1/completions", handler(completions), methods=["POST"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if background_scheduler:
            scheduler.start()
        yield
        scheduler.stop()

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
                    lifespan=lifespan)
    app.state.flm = state
    return app
