"""The Starlette app: OpenAI-compatible routes in front of one engine (docs/API.md)."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
import time
from dataclasses import dataclass
from typing import Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dllama.runtime.serve import protocol
from dllama.runtime.serve.protocol import ApiError, GenerationRequest
from dllama.runtime.serve.health import cluster_fault_types
from dllama.runtime.serve.scheduler import Running, Scheduler
from dllama.runtime.serve.session import EngineFailure, Job, Outcome, Session

MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class ServerState:
    session: Session
    scheduler: Scheduler
    model_id: str
    api_key: str | None
    health_probe: Callable[[], str | None] | None  # returns why the engine is down, or None
    down_reason: str | None = None
    created: int = 0


class _EngineStream(StreamingResponse):
    """A streaming response that always frees the engine when it ends, however it ends."""

    def __init__(self, content, running: Running, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._running = running
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._running.cancelled.set()
            self._on_close()
            with anyio.CancelScope(shield=True):
                await self._running.close()


def create_app(engine, tokenizer, *, model_id: str, context_length: int, max_queue: int = 16,
               api_key: str | None = None, health_probe: Callable[[], str | None] | None = None) -> Starlette:
    state = ServerState(session=Session(engine, tokenizer, context_length), scheduler=Scheduler(max_queue),
                        model_id=model_id, api_key=api_key, health_probe=health_probe, created=int(time.time()))
    faults = cluster_fault_types()

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                "with the key given to dllama-run serve --api-key", code="invalid_api_key")

    def down_reason() -> str | None:
        if state.down_reason is None and state.health_probe is not None:
            state.down_reason = state.health_probe()
        return state.down_reason

    def service_unavailable(reason: str) -> ApiError:
        return ApiError(503, f"the model is unavailable: {reason}; restart dllama-run serve once the cluster is back",
                        type="server_error", code="cluster_unavailable")

    def engine_error(error: BaseException) -> ApiError:
        cause = error.__cause__ if isinstance(error, EngineFailure) and error.__cause__ else error
        if isinstance(cause, faults):
            state.down_reason = f"{type(cause).__name__}: {cause}"
            return service_unavailable(state.down_reason)
        return ApiError(500, f"generation failed: {type(cause).__name__}: {cause}", type="server_error", code="engine_error")

    def make_job(req: GenerationRequest) -> Job:
        param = "messages" if req.kind == "chat" else "prompt"
        try:
            ids = state.session.prompt_ids(req.kind, req.messages, req.prompt)
        except Exception as e:  # a chat template that rejects these messages, for example
            raise protocol.invalid(param, f"could not build the prompt: {e}", code="invalid_prompt") from None
        if not ids:
            raise protocol.invalid(param, f"'{param}' produced no tokens", code="empty_prompt")
        vocab = getattr(state.session.tokenizer, "vocab_size", None)
        if vocab is not None and not all(0 <= t < vocab for t in ids):
            raise protocol.invalid(param, f"token ids must be in [0, {vocab})", code="invalid_token_id")
        room = state.session.context_length - len(ids)
        if room < 1:
            raise protocol.invalid(param, f"the prompt is {len(ids)} tokens but the context holds {state.session.context_length} "
                                          f"(including at least 1 generated token): shorten the prompt or start the server "
                                          f"with a larger --max-seq-len", code="context_length_exceeded")
        return Job(prompt_ids=ids, max_tokens=min(req.max_tokens or room, room), stop=req.stop, sampling=req.sampling)

    async def watch_disconnect(request: Request, cancelled: threading.Event) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancelled.set()
                return

    async def start_generation(request: Request, job: Job) -> tuple[Running, asyncio.Task]:
        reason = down_reason()
        if reason:
            raise service_unavailable(reason)
        cancelled = threading.Event()
        watcher = asyncio.create_task(watch_disconnect(request, cancelled))
        try:
            await state.scheduler.acquire()
        except BaseException:
            watcher.cancel()
            raise
        running = state.scheduler.start(lambda c, emit: state.session.run(job, c, emit), cancelled)
        return running, watcher

    async def generate(request: Request, parse: Callable[[bytes], GenerationRequest]) -> Response:
        authorize(request)
        req = parse(await request.body())
        job = make_job(req)
        running, watcher = await start_generation(request, job)
        rid = protocol.new_id(req.kind)
        model = req.model or state.model_id
        if req.stream:
            return await stream(req, running, watcher, rid, model)
        try:
            texts, outcome = [], None
            while outcome is None:
                event = await running.next()
                if event.kind == "text":
                    texts.append(event.value)
                elif event.kind == "error":
                    raise engine_error(event.value)
                else:
                    outcome = event.value
        finally:
            watcher.cancel()
            await running.close()
        return JSONResponse(protocol.completion_body(req.kind, rid, model, "".join(texts), outcome.finish_reason,
                                                     _usage(outcome)))

    async def stream(req: GenerationRequest, running: Running, watcher: asyncio.Task, rid: str, model: str) -> Response:
        created = int(time.time())
        # wait for the first event before sending headers, so a failing start still gets its status code
        try:
            first = await running.next()
            if first.kind == "error":
                raise engine_error(first.value)
        except BaseException:
            watcher.cancel()
            await running.close()
            raise

        async def events():
            try:
                if req.kind == "chat":
                    yield protocol.sse(protocol.chunk_body("chat", rid, created, model, "", role=True))
                event = first
                while True:
                    if event.kind == "text":
                        yield protocol.sse(protocol.chunk_body(req.kind, rid, created, model, event.value))
                    elif event.kind == "error":
                        yield protocol.sse(engine_error(event.value).body())
                        return
                    else:
                        outcome: Outcome = event.value
                        yield protocol.sse(protocol.chunk_body(req.kind, rid, created, model, None if req.kind == "chat" else "",
                                                               finish_reason=outcome.finish_reason))
                        if req.include_usage:
                            yield protocol.sse(protocol.usage_chunk_body(req.kind, rid, created, model, _usage(outcome)))
                        yield protocol.sse("[DONE]")
                        return
                    event = await running.next()
            finally:
                running.cancelled.set()  # a client gone mid-stream frees the engine at the next token

        return _EngineStream(events(), running, on_close=watcher.cancel)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, protocol.parse_chat_request)

    async def completions(request: Request) -> Response:
        return await generate(request, protocol.parse_completion_request)

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "dllama",
             "context_length": state.session.context_length}]})

    async def health(request: Request) -> Response:
        reason = down_reason()
        body = {"status": "down" if reason else "ok", "model": state.model_id, "busy": state.scheduler.busy,
                "queued": state.scheduler.waiting, "max_queue": state.scheduler.max_queue}
        if reason:
            body["error"] = reason
        return JSONResponse(body, status_code=503 if reason else 200)

    async def api_error(request: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}: see docs/API.md for the endpoints",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return JSONResponse(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).body(),
                            status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                            status_code=500)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.scheduler.shutdown()

    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    app.state.serve = state
    return app


def _usage(outcome: Outcome) -> dict:
    return protocol.usage(outcome.prompt_tokens, outcome.completion_tokens, outcome.reused_tokens)
