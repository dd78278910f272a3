"""The Starlette app: OpenAI-compatible routes in front of one engine (docs/API.md)."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import sys
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dllama.runtime.conversation import PromptTooLong, answer_room
from dllama.runtime.serve import openai_api
from dllama.runtime.serve.health import cluster_fault_types, worker_states
from dllama.runtime.serve.openai_api import ApiError, GenerationRequest
from dllama.runtime.serve.page import page_routes
from dllama.runtime.serve.runner import EngineFailure, Job, JobRunner, Outcome
from dllama.runtime.serve.scheduler import Event, Running, Scheduler

MAX_BODY_BYTES = 16 * 1024 * 1024
RECONNECT_INTERVAL_S = 1.0  # how often a server whose cluster lost a worker tries to rebuild it


@dataclass
class Generation:
    """One admitted request: its job on the engine thread and the watcher of its client."""
    request: GenerationRequest
    running: Running
    watcher: asyncio.Task
    rid: str
    model: str
    created: int

    async def close(self) -> None:
        self.watcher.cancel()
        await self.running.close()


class _EngineStream(StreamingResponse):
    """A streaming response that always frees the engine when it ends, however it ends."""

    def __init__(self, content: AsyncIterator[bytes], generation: Generation):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.running.cancelled.set()
            with anyio.CancelScope(shield=True):  # the client may be gone and this task cancelled
                await self._generation.close()


class OpenAIServer:
    """The routes, over one JobRunner (engine + tokenizer + conversation) and one Scheduler."""

    def __init__(self, runner: JobRunner, scheduler: Scheduler, model_id: str, api_key: str | None,
                 health_probe: Callable[[], str | None] | None):
        self.runner = runner
        self.scheduler = scheduler
        self.model_id = model_id
        self.api_key = api_key
        self.health_probe = health_probe    # returns why the engine is down, or None
        self.down_reason: str | None = None  # sticky until the cluster is rebuilt (or for good without reconnect)
        self.reconnect = getattr(runner.engine, "reconnect", None)  # a cluster root rebuilds itself
        self.reconnect_error: str | None = None  # why the last attempt failed
        self.reconnects = 0
        self.created = int(time.time())
        self.faults = cluster_fault_types()

    # ---------------------------------------------------------------------------------------
    # routes

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, openai_api.parse_chat_request)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, openai_api.parse_completion_request)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dllama",
             "context_length": self.runner.context_length}]})

    async def health(self, request: Request) -> Response:
        reason = self._down_reason()
        body = {"status": "down" if reason else "ok", "model": self.model_id, "busy": self.scheduler.busy,
                "queued": self.scheduler.waiting, "max_queue": self.scheduler.max_queue}
        if reason:
            body["error"] = reason
        if (workers := worker_states(self.runner.engine)) is not None:
            body["workers"] = workers
        if self.reconnect is not None:
            body["reconnects"] = self.reconnects  # times the cluster was rebuilt after losing a worker
            if reason:
                body["reconnecting"] = (f"every {RECONNECT_INTERVAL_S:g} s; last attempt: {self.reconnect_error}"
                                        if self.reconnect_error else f"every {RECONNECT_INTERVAL_S:g} s")
        return JSONResponse(body, status_code=503 if reason else 200)

    # ---------------------------------------------------------------------------------------
    # generation

    async def _generate(self, request: Request, parse: Callable[[bytes], GenerationRequest]) -> Response:
        self._authorize(request)
        req = parse(await request.body())
        generation = await self._admit(request, req, self._job(req))
        if req.stream:
            return await self._stream(generation)
        try:
            texts = []
            while (event := await generation.running.next()).kind == "text":
                texts.append(event.value)
            outcome = self._outcome(event)
        finally:
            await generation.close()
        return JSONResponse(openai_api.completion_body(req.kind, generation.rid, generation.model, "".join(texts),
                                                     outcome.finish_reason, _usage(outcome)))

    def _job(self, req: GenerationRequest) -> Job:
        param = "messages" if req.kind == "chat" else "prompt"
        try:
            ids = self.runner.prompt_ids(req.kind, req.messages, req.prompt)
        except Exception as e:  # a chat template that rejects these messages, for example
            raise openai_api.invalid(param, f"could not build the prompt: {e}", code="invalid_prompt") from None
        if not ids:
            raise openai_api.invalid(param, f"'{param}' produced no tokens", code="empty_prompt")
        vocab = getattr(self.runner.tokenizer, "vocab_size", None)
        if vocab is not None and not all(0 <= t < vocab for t in ids):
            raise openai_api.invalid(param, f"token ids must be in [0, {vocab})", code="invalid_token_id")
        try:
            room = answer_room(len(ids), self.runner.context_length)
        except PromptTooLong as e:
            raise openai_api.invalid(param, str(e), code="context_length_exceeded") from None
        return Job(prompt_ids=ids, max_tokens=min(req.max_tokens or room, room), stop=req.stop, sampling=req.sampling)

    async def _admit(self, request: Request, req: GenerationRequest, job: Job) -> Generation:
        """Waits for the engine (or refuses: 429 when the queue is full, 503 when down) and starts the job."""
        reason = self._down_reason()
        if reason:
            raise self._unavailable(reason)
        cancelled = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, cancelled))
        try:
            await self.scheduler.acquire()
        except BaseException:
            watcher.cancel()
            raise
        running = self.scheduler.start(lambda c, emit: self.runner.run(job, c, emit), cancelled)
        return Generation(req, running, watcher, openai_api.new_id(req.kind), req.model or self.model_id,
                          int(time.time()))

    async def _stream(self, generation: Generation) -> Response:
        # wait for the first event before sending headers, so a failing start still gets its status code
        try:
            first = await generation.running.next()
            if first.kind == "error":
                raise self._engine_error(first.value)
        except BaseException:
            await generation.close()
            raise
        return _EngineStream(self._sse_events(generation, first), generation)

    async def _sse_events(self, generation: Generation, event: Event) -> AsyncIterator[bytes]:
        kind, chunk = generation.request.kind, self._chunk_maker(generation)
        try:
            if kind == "chat":
                yield openai_api.sse(chunk("", role=True))
            while event.kind == "text":
                yield openai_api.sse(chunk(event.value))
                event = await generation.running.next()
            if event.kind == "error":  # headers are gone: the error travels as an event, without [DONE]
                yield openai_api.sse(self._engine_error(event.value).body())
                return
            outcome: Outcome = event.value
            yield openai_api.sse(chunk(None if kind == "chat" else "", finish_reason=outcome.finish_reason))
            if generation.request.include_usage:
                yield openai_api.sse(openai_api.usage_chunk_body(kind, generation.rid, generation.created,
                                                                 generation.model,
                                                             _usage(outcome)))
            yield openai_api.sse("[DONE]")
        finally:
            generation.running.cancelled.set()  # a client gone mid-stream frees the engine at the next token

    @staticmethod
    def _chunk_maker(generation: Generation) -> Callable[..., dict]:
        def chunk(text: str | None, **extra) -> dict:
            return openai_api.chunk_body(generation.request.kind, generation.rid, generation.created, generation.model,
                                       text, **extra)
        return chunk

    def _outcome(self, event: Event) -> Outcome:
        if event.kind == "error":
            raise self._engine_error(event.value)
        return event.value

    # ---------------------------------------------------------------------------------------
    # access and failures

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                "with the key given to dllama-run serve --api-key", code="invalid_api_key")

    async def watch_cluster(self) -> None:
        """While the cluster is down, rebuild it (re-handshake, slices streamed again) every second,
        on the engine thread so that no generation runs meanwhile."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            if self._down_reason() is not None:
                await loop.run_in_executor(self.scheduler._executor, self._try_reconnect)

    def _try_reconnect(self) -> None:
        try:
            self.reconnect()
        except self.faults as e:
            self.reconnect_error = str(e)
            return
        self.runner.conversation.cached = []  # the rebuilt cluster's KV cache is empty
        self.reconnect_error = None
        self.reconnects += 1
        self.down_reason = None
        print(f"the cluster is back (reconnect {self.reconnects})", file=sys.stderr, flush=True)

    def _down_reason(self) -> str | None:
        if self.down_reason is None and self.health_probe is not None:
            self.down_reason = self.health_probe()
        return self.down_reason

    def _unavailable(self, reason: str) -> ApiError:
        then = ("the server reconnects by itself once the worker is back: retry later" if self.reconnect is not None
                else "restart dllama-run serve once the cluster is back")
        return ApiError(503, f"the model is unavailable: {reason}; {then}", type="server_error",
                        code="cluster_unavailable")

    def _engine_error(self, error: BaseException) -> ApiError:
        cause = error.__cause__ if isinstance(error, EngineFailure) and error.__cause__ else error
        if isinstance(cause, self.faults):
            self.down_reason = f"{type(cause).__name__}: {cause}"
            return self._unavailable(self.down_reason)
        return ApiError(500, f"generation failed: {type(cause).__name__}: {cause}", type="server_error",
                        code="engine_error")


async def _watch_disconnect(request: Request, cancelled: threading.Event) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancelled.set()
            return


def _usage(outcome: Outcome) -> dict:
    return openai_api.usage(outcome.prompt_tokens, outcome.completion_tokens, outcome.reused_tokens)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path}: see docs/API.md for the endpoints",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    code = "not_found" if exc.status_code == 404 else None
    return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                        status_code=500)


def create_app(engine, tokenizer, *, model_id: str, context_length: int, max_queue: int = 16,
               api_key: str | None = None, health_probe: Callable[[], str | None] | None = None) -> Starlette:
    server = OpenAIServer(JobRunner(engine, tokenizer, context_length), Scheduler(max_queue), model_id, api_key,
                          health_probe)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.create_task(server.watch_cluster()) if server.reconnect is not None else None
        yield
        if watcher is not None:
            watcher.cancel()
        server.scheduler.shutdown()

    routes = [
        *page_routes(),  # the chat page at /
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    app.state.server = server
    return app
