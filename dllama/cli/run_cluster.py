"""`dllama-run worker` and `dllama-run plan`: a cluster's worker, and what each node of a split holds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dllama.cli import options
from dllama.cli.edge import CliError, edge, note
from dllama.cli.loading import check_port, model_files
from dllama.formats import ModelFile
from dllama.runtime.distributed.node_memory import (
    SERVER_BYTES,
    SplitError,
    cluster_weights,
    memory_plan,
    parse_size,
    tokenizer_bytes,
)
from dllama.runtime.distributed.protocol import DEFAULT_PORT
from dllama.runtime.engine import PREFILL_BATCH


def worker_command(
    host: str = typer.Option("0.0.0.0", help="address to listen on"),
    port: int = typer.Option(DEFAULT_PORT, help="TCP port to listen on (0: any free port, printed on stderr)"),
    nthreads: Optional[int] = options.NTHREADS,
    model: Optional[str] = typer.Option(None, help="this board's own copy of the root's model (a .m, a stored name, "
                                                   "or a source converted as the root converted it): load slices "
                                                   "from it instead of receiving them (checked byte for byte "
                                                   "against the root's by a full-file digest)"),
    quant: Optional[str] = options.QUANT,
    cluster_key_file: Optional[Path] = options.CLUSTER_KEY_FILE,
) -> None:
    """Wait for a root and compute a share of each token.

    Example: dllama-run worker --port 9999 --cluster-key-file cluster.key
    (then on the root: dllama-run --workers pi1:9999 --cluster-key-file cluster.key ...)
    """
    from dllama.runtime.distributed.auth import load_cluster_key

    with edge():
        check_port(host, port)
        key = load_cluster_key(cluster_key_file)
        path = None if model is None else model_files(model, None, None, quant, with_tokenizer=False).model
        worker = _start_worker(host, port, path, nthreads, key)
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        note("worker stopped")


def _start_worker(host: str, port: int, model: Optional[Path], nthreads: Optional[int], key: Optional[bytes] = None):
    from dllama.errors import DllamaError
    from dllama.runtime.distributed.worker import Worker

    try:
        return Worker(host, port, model_path=model, nthreads=nthreads, cluster_key=key)
    except (OSError, DllamaError) as e:  # the address is taken, the --model file is broken, bad --threads
        raise CliError(f"cannot start the worker on {host}:{port}: {getattr(e, 'strerror', None) or e}") from e


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def plan_command(
    source: Optional[str] = options.SOURCE,
    model: Optional[Path] = options.MODEL,
    quant: Optional[str] = options.QUANT,
    nodes: int = typer.Option(..., help="number of nodes (root + workers); any count up to the model's heads"),
    max_seq_len: int = typer.Option(2048, help="positions of KV cache each node holds"),
    ram: Optional[str] = typer.Option(None, help="memory of one board, e.g. 1G or 512M: say whether each node fits"),
    batch: int = typer.Option(PREFILL_BATCH, min=1, help="prompt tokens per forward batch the buffers are sized for "
                                                        f"(the runtime evaluates prompts {PREFILL_BATCH} at a time)"),
    parallel: int = typer.Option(1, min=1, help="conversations at once (serve --parallel): a KV cache each"),
    serve: bool = typer.Option(False, "--serve", help="the root runs dllama-run serve: count its tokenizer and "
                                                      "HTTP server too"),
    as_json: bool = options.AS_JSON,
    weights: Optional[str] = options.WEIGHTS,
    root_compute: str = options.ROOT_COMPUTE,
    workers: Optional[str] = typer.Option(None, help="with --weights auto: the workers to probe (host:port,...); "
                                                     "--nodes must be 1 + their number"),
    cluster_key_file: Optional[Path] = options.CLUSTER_KEY_FILE,
) -> None:
    """Print each node's share and memory (weights, KV cache, buffers) for a split of MODEL over NODES.

    Example: dllama-run plan HuggingFaceTB/SmolLM2-135M-Instruct --nodes 3 --weights 2,1,1 --ram 1G
    (add --serve --parallel 4 for the root of `dllama-run serve --parallel 4`)
    """
    with edge():
        model = model_files(source, model, None, quant, with_tokenizer=False).model
        header = ModelFile(model).header  # the header checked against the file's real size
        seq = min(max_seq_len, header.max_seq_len)
        split_weights = _plan_weights(nodes, weights, root_compute, workers, cluster_key_file)
        plan = memory_plan(header, nodes, seq, batch, weights=split_weights, parallel=parallel, serve=serve)
        limit = parse_size(ram) if ram else None
    rows = [{
        "node": m.node, "role": "root" if m.node == 0 else "worker", "share": m.share.describe(),
        "heads": list(m.share.heads), "kv_heads": list(m.share.kv_heads), "ffn_rows": list(m.share.ffn),
        "vocab_rows": list(m.share.vocab), "weights": m.weights, "kv_cache": m.kv_cache,
        "buffers": m.buffers, "runtime": m.runtime, "server": m.server, "total": m.total, "mapped_only": m.mapped_only,
        "fits": None if limit is None else m.total <= limit,
    } for m in plan]
    if as_json:
        print(json.dumps({"model": str(model), "nodes": nodes, "max_seq_len": seq, "parallel": parallel, "serve": serve,
                          "ram": limit, "weights": list(split_weights), "per_node": rows}))
        return
    print(f"{model}: {nodes} node(s), max_seq_len {seq}" + (f" x {parallel} conversations" if parallel > 1 else "")
          + f", weights {','.join(f'{w:.3g}' for w in split_weights)}")
    server = f"{'server':>12}" if serve else ""
    print(f"{'node':<10}{'weights':>14}{'kv cache':>14}{'buffers':>12}{'runtime':>12}{server}{'total':>14}  fits")
    for r in rows:
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else f"NO (> {_mib(limit)})")
        label = f"{r['node']} {r['role']}"
        server = f"{_mib(r['server']):>12}" if serve else ""
        print(f"{label:<10}{_mib(r['weights']):>14}{_mib(r['kv_cache']):>14}{_mib(r['buffers']):>12}"
              f"{_mib(r['runtime']):>12}{server}{_mib(r['total']):>14}  {fits}")
    for r in rows:
        print(f"node {r['node']}: {r['share']}")
    print(f"the root's {_mib(plan[0].mapped_only)} embedding stays in the file: it reads the rows of the tokens it sees"
          + (f"; its server column is serve's tokenizer ({_mib(tokenizer_bytes(header))}) and HTTP server "
             f"({_mib(SERVER_BYTES)})" if serve else
             f", and dllama-run's tokenizer adds ~{_mib(tokenizer_bytes(header))} to it (serve's HTTP server "
             f"~{_mib(SERVER_BYTES)} more: --serve counts both)"))
    if limit is not None and not all(r["fits"] for r in rows):
        raise typer.Exit(2)


def _plan_weights(nodes: int, weights: Optional[str], root_compute: str, workers: Optional[str],
                  cluster_key_file: Optional[Path]) -> tuple[float, ...]:
    """--weights as numbers, or (auto) measured by probing --workers as the root would when it connects."""
    if weights is None or weights.strip().lower() != "auto":
        return cluster_weights(nodes, weights, root_compute)
    from dllama.runtime.distributed.auth import load_cluster_key
    from dllama.runtime.distributed.root import measure_weights, parse_workers

    addresses = parse_workers(workers or "")
    if len(addresses) != nodes - 1:
        raise SplitError(f"--weights auto probes the workers: give --workers with {nodes - 1} addresses for "
                         f"{nodes} nodes (it got {len(addresses)})")
    cluster_weights(nodes, None, root_compute)  # checks --root-compute
    return measure_weights(addresses, root_compute, log=note, cluster_key=load_cluster_key(cluster_key_file))

