"""`dllama-run serve`: an OpenAI-compatible HTTP API in front of one engine or a cluster's root.

    from dllama.runtime.serve import create_app, run_server
    run_server(engine, tokenizer, model_id="tinyllama", context_length=2048)   # blocks

docs/API.md describes the endpoints, parameters, errors and the queue.
"""
from __future__ import annotations

import sys
from typing import Callable

from dllama.runtime.serve.app import create_app
from dllama.runtime.serve.health import worker_probe
from dllama.runtime.serve.protocol import ApiError

__all__ = ["ApiError", "create_app", "run_server", "serve_model"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 16


def run_server(engine, tokenizer, *, model_id: str, context_length: int, host: str = DEFAULT_HOST,
               port: int = DEFAULT_PORT, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               health_probe: Callable[[], str | None] | None = None) -> None:
    """Serves until interrupted. Progress and the address go to stderr."""
    import uvicorn

    app = create_app(engine, tokenizer, model_id=model_id, context_length=context_length, max_queue=max_queue,
                     api_key=api_key, health_probe=health_probe)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    print(f"serving {model_id} on http://{host}:{port}/v1 (context {context_length} tokens, queue {max_queue}"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    server.run()


def serve_model(model: str, tokenizer: str, *, workers: str | None = None, max_seq_len: int = 2048,
                nthreads: int | None = None, buffer_float_type: str | None = None, **server_options) -> None:
    """Loads the model (on this machine, or as the root of `workers`) and the tokenizer, then serves."""
    from pathlib import Path

    from dllama.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer)
    if workers:
        from dllama.runtime.distributed.root import DistributedEngine, parse_workers

        options = {"buffer_type": buffer_float_type} if buffer_float_type else {}
        engine = DistributedEngine(model, parse_workers(workers), max_seq_len=max_seq_len, nthreads=nthreads, **options)
    else:
        from dllama.runtime.engine import Engine

        engine = Engine.load(model, max_seq_len=max_seq_len, nthreads=nthreads)
    context = int(getattr(engine, "max_seq_len", max_seq_len))
    run_server(engine, tok, model_id=Path(model).stem, context_length=context,
               health_probe=worker_probe(engine), **server_options)
