"""`dllama-run serve`: the OpenAI-compatible HTTP API (docs/API.md) in front of one engine or a cluster's root."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dllama.cli import options
from dllama.cli.edge import edge, stop_quietly
from dllama.cli.loading import ClusterOptions, load_model
from dllama.runtime.engine import DEFAULT_MAX_SEQ_LEN
from dllama.runtime.serve import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PORT


def serve_command(
    model: Path = typer.Option(..., help="the .m model file"),
    tokenizer: Path = typer.Option(..., help="the .t tokenizer file"),
    host: str = typer.Option(DEFAULT_HOST,
                             help="address to bind (loopback by default; 0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(DEFAULT_PORT, help="TCP port"),
    api_key: Optional[str] = typer.Option(None, envvar="DLLAMA_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1/* (or set DLLAMA_API_KEY)"),
    max_queue: int = typer.Option(DEFAULT_MAX_QUEUE, min=0,
                                  help="requests that may wait while one generates; more get 429"),
    max_seq_len: int = typer.Option(DEFAULT_MAX_SEQ_LEN, min=2,
                                    help="context (KV cache) positions, prompt and answer together"),
    nthreads: Optional[int] = typer.Option(None, help="compute threads on this node"),
    workers: Optional[str] = options.WORKERS,
    buffer_float_type: Optional[str] = options.BUFFER_FLOAT_TYPE,
    weights: Optional[str] = options.WEIGHTS,
    root_compute: str = options.ROOT_COMPUTE,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (docs/API.md).

    Example: dllama-run serve --model tinyllama_q40.m --tokenizer tinyllama.t --port 8080
    """
    from dllama.runtime.serve import run_server, worker_probe

    with edge(interrupted=stop_quietly):
        loaded = load_model(model, tokenizer, max_seq_len, nthreads,
                            ClusterOptions(workers, buffer_float_type, weights, root_compute))
        run_server(loaded.engine, loaded.tokenizer, model_id=model.stem, context_length=loaded.engine.max_seq_len,
                   host=host, port=port, api_key=api_key, max_queue=max_queue,
                   health_probe=worker_probe(loaded.engine))
