"""`dllama-run serve`: the OpenAI-compatible HTTP API (docs/API.md) in front of one engine or a cluster's root."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from dllama.cli import options
from dllama.cli.edge import edge, fail, stop_quietly
from dllama.cli.loading import ClusterOptions, check_port, load_model, model_files
from dllama.runtime.distributed.node_memory import DEFAULT_MAX_PARALLEL
from dllama.runtime.engine import DEFAULT_MAX_SEQ_LEN
from dllama.runtime.serve import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PORT

API_KEY_ENV = "DLLAMA_API_KEY"


def serve_command(
    source: Optional[str] = options.SOURCE,
    model: Optional[Path] = options.MODEL,
    tokenizer: Optional[Path] = options.TOKENIZER,
    quant: Optional[str] = options.QUANT,
    host: str = typer.Option(DEFAULT_HOST,
                             help="address to bind (loopback by default; 0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(DEFAULT_PORT, help="TCP port (0: one the OS picks, named in the log)"),
    api_key_file: Optional[Path] = typer.Option(None, help="require 'Authorization: Bearer KEY' on /v1/*, KEY being "
                                                "this file's first line (or set DLLAMA_API_KEY)"),
    api_key: Optional[str] = typer.Option(None, help="the key itself: visible to every user of this machine in `ps`; "
                                          "prefer --api-key-file or DLLAMA_API_KEY"),
    cors_origin: Optional[List[str]] = typer.Option(None, help="let web pages from this origin call the API "
                                                    "(e.g. http://localhost:3000, or * for any); repeatable"),
    max_queue: int = typer.Option(DEFAULT_MAX_QUEUE, min=0,
                                  help="requests that may wait while one generates; more get 429"),
    parallel: Optional[int] = typer.Option(None, min=1, help="conversations generated at once, each with its own KV "
                                           f"cache (default: what the memory of this machine, or of every node of "
                                           f"a cluster, holds, at most {DEFAULT_MAX_PARALLEL}; a cluster takes up to "
                                           "64)"),
    max_connections: int = typer.Option(256, min=1, help="open HTTP connections at most; a newcomer closes the "
                                        "one that has waited longest for its client"),
    request_timeout: float = typer.Option(30.0, min=0.1, help="seconds a client has to send a request's headers, "
                                          "then as many for its body (else 408)"),
    max_body_mib: float = typer.Option(16.0, min=0.001, help="largest request body in MiB (else 413)"),
    max_seq_len: int = typer.Option(DEFAULT_MAX_SEQ_LEN, min=2,
                                    help="context (KV cache) positions, prompt and answer together"),
    nthreads: Optional[int] = options.NTHREADS,
    workers: Optional[str] = options.WORKERS,
    buffer_float_type: Optional[str] = options.BUFFER_FLOAT_TYPE,
    weights: Optional[str] = options.WEIGHTS,
    root_compute: str = options.ROOT_COMPUTE,
    cluster_key_file: Optional[Path] = options.CLUSTER_KEY_FILE,
    exchange: str = options.EXCHANGE,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (docs/API.md).

    Example: dllama-run serve HuggingFaceTB/SmolLM2-135M-Instruct --port 8080 --api-key-file key.txt
    """
    from dllama.runtime.serve import run_server, worker_probe
    from dllama.runtime.serve.connections import MiB, ServeLimits

    key = _api_key(api_key, api_key_file)
    limits = ServeLimits(max_body_bytes=int(max_body_mib * MiB), request_timeout_s=request_timeout,
                         max_connections=max_connections)
    _log_to_stderr()
    with edge(interrupted=stop_quietly):
        check_port(host, port)
        files = model_files(source, model, tokenizer, quant)
        slots = _parallel(parallel, files.model, max_seq_len, workers)
        loaded = load_model(files.model, files.tokenizer, max_seq_len, nthreads,
                            ClusterOptions(workers, buffer_float_type, weights, root_compute, cluster_key_file,
                                           exchange), slots)
        if slots is None:  # a cluster's default: the root sized it from every node's free memory as it connected
            slots = loaded.engine.slots
            _say_parallel(slots, "what every node's memory holds", f"every node keeps a KV cache slice of "
                          f"{loaded.engine.max_seq_len} positions for each (dllama-run plan --parallel {slots} shows "
                          "each node's memory)")
        run_server(loaded.engine, loaded.tokenizer, model_id=files.name, context_length=loaded.engine.max_seq_len,
                   host=host, port=port, api_key=key, max_queue=max_queue, health_probe=worker_probe(loaded.engine),
                   limits=limits, cors_origins=cors_origin or (), parallel=slots)


def _parallel(asked: Optional[int], model: Path, max_seq_len: int, workers: Optional[str]) -> Optional[int]:
    """--parallel, or what fits this machine's memory (at most DEFAULT_MAX_PARALLEL), said in the log; None for a
    cluster's default, which the root sizes from every node's free memory when it connects (DistributedEngine)."""
    from dllama.formats import ModelFile
    from dllama.runtime.distributed.node_memory import kv_cache_bytes, parallel_that_fits
    from dllama.runtime.distributed.probe import available_memory
    from dllama.runtime.distributed.protocol import MAX_SLOTS
    from dllama.runtime.engine import PREFILL_BATCH
    from dllama.runtime.model import whole_model_share

    header = ModelFile(model).header
    seq = min(max_seq_len, header.max_seq_len) if header.max_seq_len > 0 else max_seq_len
    if workers:
        if (asked or 1) > MAX_SLOTS:
            fail(f"--parallel {asked}: a cluster serves at most {MAX_SLOTS} conversations at once")
        if asked:
            _say_parallel(asked, None, f"every node keeps a KV cache slice of {seq} positions for each (dllama-run "
                          f"plan --parallel {asked} shows each node's memory)")
        return asked
    slots = asked or parallel_that_fits(header, seq, [available_memory()], PREFILL_BATCH, DEFAULT_MAX_PARALLEL)
    per_slot = kv_cache_bytes(header, whole_model_share(header), seq)
    _say_parallel(slots, None if asked else "what this machine's memory holds",
                  f"KV cache {slots} x {per_slot / 2**20:.0f} MiB = {slots * per_slot / 2**20:.0f} MiB for {seq} "
                  "positions each")
    return slots


def _say_parallel(slots: int, default: Optional[str], memory: str) -> None:
    """The start-up line: how many conversations at once, where the number came from, what they take."""
    logging.getLogger("dllama.serve").info(
        "%d conversation%s at once (--parallel %d%s): %s", slots, "s" if slots > 1 else "", slots,
        f", {default}" if default else "", memory)


def _api_key(given: Optional[str], path: Optional[Path]) -> Optional[str]:
    """The key from --api-key-file or --api-key, else DLLAMA_API_KEY; an empty key is refused, since it would let
    an empty bearer token in."""
    if path is not None and given is not None:
        fail("the API key is given twice (--api-key-file and --api-key): keep one")
    env = os.environ.get(API_KEY_ENV)
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the API key file {path}: {e}")
        key, where = (lines[0].strip() if lines else ""), f"the API key file {path}"
    else:
        key, where = (given if given is not None else env), ("--api-key" if given is not None else API_KEY_ENV)
    if key is not None and not key.strip():
        fail(f"{where} is empty: an empty key would let anyone in; give a key, or none to serve without one")
    return None if key is None else key.strip()


def _log_to_stderr() -> None:
    logger = logging.getLogger("dllama.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
