"""`dllama-run serve`: an OpenAI-compatible HTTP API in front of one engine or a cluster's root.

    from dllama.runtime.serve import create_app, run_server
    run_server(engine, tokenizer, model_id="tinyllama", context_length=2048)   # blocks

Progress, the address and one line per request go to the "dllama.serve" logger (the CLI sends it to stderr).

docs/API.md describes the endpoints, parameters, errors and the queue.
"""
from __future__ import annotations

import logging
import socket
from typing import Callable, Sequence

__all__ = ["ApiError", "create_app", "run_server", "worker_probe"]


def __getattr__(name: str):
    # imported on first use, so `dllama-run worker` and friends do not load the HTTP stack (~6 MiB)
    if name == "create_app":
        from dllama.runtime.serve.app import create_app
        return create_app
    if name == "worker_probe":
        from dllama.runtime.serve.health import worker_probe
        return worker_probe
    if name == "ApiError":
        from dllama.runtime.serve.openai_api import ApiError
        return ApiError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 16


def run_server(engine, tokenizer, *, model_id: str, context_length: int, host: str = DEFAULT_HOST,
               port: int = DEFAULT_PORT, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               health_probe: Callable[[], str | None] | None = None, limits=None,
               cors_origins: Sequence[str] = (), parallel: int = 1) -> None:
    """Serves until interrupted. limits: a connections.ServeLimits (body size, timeouts, connections); parallel:
    generations at once (an engine with as many KV cache slots)."""
    import uvicorn

    from dllama.runtime.serve.app import create_app
    from dllama.runtime.serve.connections import ServeLimits, uvicorn_config

    limits = limits or ServeLimits()
    app = create_app(engine, tokenizer, model_id=model_id, context_length=context_length, max_queue=max_queue,
                     api_key=api_key, health_probe=health_probe, limits=limits, cors_origins=cors_origins,
                     parallel=parallel)
    config = uvicorn_config(app, host, port)
    sock = config.bind_socket()  # bound and listening before the log line, whose port is the OS's for --port 0
    sock.listen(socket.SOMAXCONN)
    logging.getLogger("dllama.serve").info(
        "serving %s on http://%s:%d/v1 (context %d tokens, queue %d, at most %d connections%s%s)", model_id, host,
        sock.getsockname()[1], context_length, max_queue, limits.max_connections,
        ", API key required" if api_key else "", f", CORS for {', '.join(cors_origins)}" if cors_origins else "")
    uvicorn.Server(config).run(sockets=[sock])

