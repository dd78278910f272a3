"""The Starlette app: OpenAI-compatible routes in front of one engine (docs/API.md)."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dllama.runtime.conversation import PromptTooLong, answer_room
from dllama.runtime.serve import openai_api
from dllama.runtime.serve.connections import ConnectionTable, ServeLimits
from dllama.runtime.serve.health import cluster_fault_types, worker_states
from dllama.runtime.serve.metrics import ServerMetrics
from dllama.runtime.serve.openai_api import ApiError, GenerationRequest
from dllama.runtime.serve.page import page_routes
from dllama.runtime.serve.runner import EngineFailure, Job, JobRunner, Outcome, Piece
from dllama.runtime.serve.scheduler import Event, Running, Scheduler
from dllama.runtime.serve.tools import AnswerPlan, AnswerStream, check_response_format, check_tools, plan_answer
from dllama.runtime.structured import GrammarError, GrammarVocabulary

RECONNECT_INTERVAL_S = 1.0  # how often a server whose cluster lost a worker tries to rebuild it
PREPARING_THREADS = 2       # requests parsed and tokenized at once, off the event loop
MAX_REMEMBERED_FIELDS = 256  # unknown field names logged once each, up to this many
CLOSING_CODES = ("request_too_large", "request_timeout", "incomplete_request")

log = logging.getLogger("dllama.serve")


@dataclass
class Generation:
    """One admitted request: its job on the engine thread and the watcher of its client."""
    request: GenerationRequest
    running: Running
    watcher: asyncio.Task
    rid: str
    model: str
    created: int
    http_state: object = None                   # the request's state: the usage, for the log line
    received: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0                       # when the engine took the job
    plan: AnswerPlan | None = None  # chat: the answer's tools, grammar and how to read it

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
                 health_probe: Callable[[], str | None] | None, limits: ServeLimits = ServeLimits(),
                 connections: ConnectionTable | None = None):
        if api_key == "":
            raise ValueError("an empty API key would let an empty bearer token in: give a key or none")
        self.runner = runner
        self.scheduler = scheduler
        self.model_id = model_id
        self.api_key = api_key
        self.limits = limits
        self.connections = connections or ConnectionTable(limits.max_connections)
        self.metrics = ServerMetrics(queue_depth=lambda: scheduler.waiting, busy=lambda: float(scheduler.busy),
                                     up=lambda: float(self._down_reason() is None),
                                     connections=lambda: len(self.connections.open),
                                     steps=lambda: float(runner.batcher.steps if runner.batcher else 0))
        self.ignored_fields: set[str] = set()    # unknown request fields already named in the log
        self._preparing: anyio.CapacityLimiter | None = None
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
                "queued": self.scheduler.waiting, "max_queue": self.scheduler.max_queue,
                "parallel": self.runner.slots, "generating": self.runner.active}
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

    async def metrics_page(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    # ---------------------------------------------------------------------------------------
    # generation

    async def _generate(self, request: Request, parse: Callable[[bytes], GenerationRequest]) -> Response:
        self._authorize(request)
        raw = await read_body(request, self.limits)
        # parsing and tokenizing take milliseconds to seconds of CPU: never on the event loop
        req = await self._off_loop(parse, raw)
        del raw
        self._note_ignored(req.ignored_fields, request.url.path)
        job, plan = await self._off_loop(self._prepare, req)
        generation = await self._admit(request, req, job)
        generation.plan = plan
        if req.stream:
            return await self._stream(generation)
        try:
            pieces: list[Piece] = []
            while (event := await generation.running.next()).kind == "text":
                pieces.append(event.value)
            outcome = self._outcome(event)
        finally:
            await generation.close()
        self._finished(generation, outcome)
        logprobs = self._logprobs(req.kind, pieces) if req.logprobs else None
        text = "".join(p.text for p in pieces)
        content, calls = plan.parse(text) if plan else (text, [])
        return JSONResponse(openai_api.completion_body(req.kind, generation.rid, generation.model, content,
                                                     "tool_calls" if calls else outcome.finish_reason,
                                                     _usage(outcome), logprobs, tool_calls=calls))

    async def _off_loop(self, work: Callable, *args):
        if self._preparing is None:
            self._preparing = anyio.CapacityLimiter(PREPARING_THREADS)
        return await anyio.to_thread.run_sync(work, *args, limiter=self._preparing)

    def _note_ignored(self, names: Sequence[str], path: str) -> None:
        new = [n for n in names if n not in self.ignored_fields][:10]
        if new and len(self.ignored_fields) < MAX_REMEMBERED_FIELDS:
            self.ignored_fields.update(new)
            log.info("ignored unknown field%s %s (first seen on %s); every later one is ignored silently",
                     "s" if len(new) > 1 else "", ", ".join(repr(n[:64]) for n in new), path)

    def _plan(self, req: GenerationRequest) -> AnswerPlan | None:
        if req.kind != "chat":
            return None
        try:
            plan = plan_answer(getattr(self.runner.tokenizer, "chat_template", None), req.messages,
                               check_tools("tools", req.tools) if req.tools else None, req.tool_choice,
                               check_response_format("response_format", req.response_format)
                               if req.response_format is not None else None)
            if plan.grammar is not None:
                GrammarVocabulary.of(self.runner.tokenizer).check(plan.grammar)
        except GrammarError as e:
            raise openai_api.invalid("tools" if req.tools else "response_format", str(e),
                                     code="invalid_schema") from None
        return plan

    def _prepare(self, req: GenerationRequest) -> tuple[Job, AnswerPlan | None]:
        plan = self._plan(req)
        return self._job(req, plan), plan

    def _job(self, req: GenerationRequest, plan: AnswerPlan | None = None) -> Job:
        param = "messages" if req.kind == "chat" else "prompt"
        messages, template_vars = (plan.messages, plan.template_vars) if plan else (req.messages, None)
        try:
            ids = self.runner.prompt_ids(req.kind, messages, req.prompt, template_vars)
        except PromptTooLong as e:
            raise openai_api.invalid(param, str(e), code="context_length_exceeded") from None
        except Exception as e:  # a chat template that rejects these messages, for example
            raise openai_api.invalid(param, f"could not build the prompt: {e}", code="invalid_prompt") from None
        if not ids:
            raise openai_api.invalid(param, f"'{param}' produced no tokens", code="empty_prompt")
        vocab = getattr(self.runner.tokenizer, "vocab_size", None)
        if vocab is not None and not all(0 <= t < vocab for t in ids):
            raise openai_api.invalid(param, f"token ids must be in [0, {vocab})", code="invalid_token_id")
        if vocab is not None and any(not 0 <= t < vocab for t in req.sampling.logit_bias):
            raise openai_api.invalid("logit_bias", f"'logit_bias' keys must be token ids in [0, {vocab})")
        try:
            room = answer_room(len(ids), self.runner.context_length)
        except PromptTooLong as e:
            raise openai_api.invalid(param, str(e), code="context_length_exceeded") from None
        return Job(prompt_ids=ids, max_tokens=min(req.max_tokens or room, room), stop=req.stop, sampling=req.sampling,
                   grammar=plan.grammar if plan else None)

    def _logprobs(self, kind: str, pieces: Sequence[Piece], text_offset: int = 0) -> dict:
        decode = self.runner.tokenizer.decode
        return openai_api.logprobs_body(kind, [lp for p in pieces for lp in p.logprobs], lambda t: decode([t]),
                                        text_offset)

    def _finished(self, generation: Generation, outcome: Outcome) -> None:
        """Counts a generation in the metrics and hands its usage to the request's log line."""
        queued = max(generation.admitted - generation.received, 0.0)
        self.metrics.observe_generation(outcome.prompt_tokens, outcome.reused_tokens, outcome.completion_tokens,
                                        queued + outcome.first_token_s, outcome.decode_s)
        if generation.http_state is not None:
            generation.http_state.usage = (outcome.prompt_tokens, outcome.completion_tokens)

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
        admitted = time.perf_counter()
        running = self.scheduler.start(lambda c, emit: self.runner.run(job, c, emit), cancelled)
        return Generation(req, running, watcher, openai_api.new_id(req.kind), req.model or self.model_id,
                          int(time.time()), request.state, request.state.received, admitted)

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
        offset = 0  # of the text sent so far, for the completions' text_offset
        try:
            if kind == "chat":
                yield openai_api.sse(chunk("", role=True))
            # an answer read for tool calls: a call is sent whole once complete (tools.AnswerStream)
            reader = AnswerStream(generation.plan) if generation.plan is not None and generation.plan.calls_tools \
                else None
            pending: list[Piece] = []
            while event.kind == "text":
                piece: Piece = event.value
                pending.append(piece)  # pieces whose text is not sent yet (their logprobs go with it)
                text = piece.text if reader is None else reader.push(piece.text)
                if text:
                    logprobs = self._logprobs(kind, pending, offset) if generation.request.logprobs else None
                    yield openai_api.sse(chunk(text, logprobs=logprobs))
                    offset += len(text)
                    pending = []
                event = await generation.running.next()
            if event.kind == "error":  # headers are gone: the error travels as an event, without [DONE]
                yield openai_api.sse(self._engine_error(event.value).body())
                return
            outcome: Outcome = event.value
            self._finished(generation, outcome)
            finish_reason = outcome.finish_reason
            if reader is not None:
                content, calls = reader.finish()
                logprobs = self._logprobs(kind, pending, offset) if generation.request.logprobs else None
                if calls:
                    finish_reason = "tool_calls"
                    yield openai_api.sse(chunk(None, tool_calls=calls, logprobs=logprobs))
                elif content:
                    yield openai_api.sse(chunk(content, logprobs=logprobs))
            yield openai_api.sse(chunk(None if kind == "chat" else "", finish_reason=finish_reason))
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
                                "with the key dllama-run serve was given (--api-key-file or DLLAMA_API_KEY)",
                           code="invalid_api_key")

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
        self.runner.forget_caches()  # the rebuilt cluster's KV cache is empty
        self.reconnect_error = None
        self.reconnects += 1
        self.down_reason = None
        log.warning("the cluster is back (reconnect %d)", self.reconnects)

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


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The request body, refused past limits.max_body_bytes (413) or when it does not arrive within
    limits.request_timeout_s (408): a half-sent body must not hold a connection forever."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits)
    body = bytearray()
    try:
        with anyio.fail_after(limits.request_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise _too_large(limits)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.request_timeout_s:g} s",
                       code="request_timeout") from None
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before sending the whole body",
                       code="incomplete_request") from None
    return bytes(body)


def _too_large(limits: ServeLimits) -> ApiError:
    return ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes (dllama-run serve "
                    "--max-body-mib)", code="request_too_large")


def _usage(outcome: Outcome) -> dict:
    return openai_api.usage(outcome.prompt_tokens, outcome.completion_tokens, outcome.reused_tokens)


async def _api_error(request: Request, exc: ApiError) -> Response:
    # a body left unread (too large, too slow, cut short) leaves the connection unusable
    headers = {"Connection": "close"} if exc.status in (400, 408, 413) and exc.code in CLOSING_CODES else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no route {request.url.path}: see docs/API.md for the endpoints",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    code = "not_found" if exc.status_code == 404 else None
    return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                        status_code=500)


class RequestLog:
    """ASGI middleware: one log line per request (method, path, status, tokens, duration) and its metrics."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        state["received"] = start
        status = 500   # if the app fails before it answers
        done = False

        def finish() -> None:
            nonlocal done
            if done:
                return
            done = True
            seconds = time.perf_counter() - start
            path = scope.get("path", "")
            self.metrics.observe_request(path, status, seconds)
            usage = state.get("usage")
            tokens = f" {usage[0]}+{usage[1]} tokens" if usage else ""
            log.info("%s %s %d%s %.3f s", scope.get("method", ""), path[:200], status, tokens, seconds)

        async def logged_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()  # before the last bytes go: a client holding the whole answer finds its line logged
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            finish()


def create_app(engine, tokenizer, *, model_id: str, context_length: int, max_queue: int = 16,
               api_key: str | None = None, health_probe: Callable[[], str | None] | None = None,
               limits: ServeLimits = ServeLimits(), cors_origins: Sequence[str] = (), parallel: int = 1) -> Starlette:
    """`parallel`: generations at once, each in its own KV cache slot (an engine loaded with slots >= parallel)."""
    if parallel > getattr(engine, "slots", 1):
        raise ValueError(f"parallel {parallel} needs an engine with as many KV cache slots (Engine.load(slots=N))")
    server = OpenAIServer(JobRunner(engine, tokenizer, context_length, parallel), Scheduler(max_queue, parallel),
                          model_id, api_key, health_probe, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        watcher = asyncio.create_task(server.watch_cluster()) if server.reconnect is not None else None
        yield
        if watcher is not None:
            watcher.cancel()
        server.scheduler.shutdown()
        server.runner.close()

    routes = [
        *page_routes(),  # the chat page at /
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_page, methods=["GET"]),
    ]
    middleware = [Middleware(RequestLog, metrics=server.metrics)]
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"], max_age=600))
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = server
    app.state.limits = limits
    app.state.connections = server.connections
    return app
