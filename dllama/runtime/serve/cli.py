"""`dllama-run serve` (registered on the runtime's typer app by `register`).

Also runnable alone: `python -m dllama.runtime.serve.cli serve --model M --tokenizer T`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from dllama.runtime.serve import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PORT, serve_model

DEFAULT_MAX_SEQ_LEN = 2048


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def serve_command(
    model: Path = typer.Option(..., help="the .m model file"),
    tokenizer: Path = typer.Option(..., help="the .t tokenizer file"),
    host: str = typer.Option(DEFAULT_HOST, help="address to bind (loopback by default; 0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(DEFAULT_PORT, help="TCP port"),
    api_key: Optional[str] = typer.Option(None, envvar="DLLAMA_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on /v1/* (or set DLLAMA_API_KEY)"),
    max_queue: int = typer.Option(DEFAULT_MAX_QUEUE, min=0, help="requests that may wait while one generates; more get 429"),
    max_seq_len: int = typer.Option(DEFAULT_MAX_SEQ_LEN, min=2, help="context (KV cache) positions, prompt and answer together"),
    nthreads: Optional[int] = typer.Option(None, help="compute threads on this node"),
    workers: Optional[str] = typer.Option(None, help="run as the root of a cluster: host:port,host:port,..."),
    buffer_float_type: Optional[str] = typer.Option(None, help="with --workers: q80 (default) or f32 activations on the wire"),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (docs/API.md).

    Example: dllama-run serve --model tinyllama_q40.m --tokenizer tinyllama.t --port 8080
    """
    for path, what in ((model, "model"), (tokenizer, "tokenizer")):
        if not path.is_file():
            _fail(f"{what} file {path} does not exist: pass the converted .{'m' if what == 'model' else 't'} file")
    try:
        serve_model(str(model), str(tokenizer), workers=workers, max_seq_len=max_seq_len, nthreads=nthreads,
                    buffer_float_type=buffer_float_type, host=host, port=port, api_key=api_key, max_queue=max_queue)
    except KeyboardInterrupt:
        pass
    except (ValueError, OSError, RuntimeError) as e:  # bad files, unreachable workers, port in use
        _fail(str(e) or type(e).__name__)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


app = typer.Typer(add_completion=False, no_args_is_help=True)
app.callback()(lambda: None)  # keep `serve` a subcommand when run alone
register(app)

if __name__ == "__main__":
    app()
