"""A model and its tokenizer, loaded and checked against each other (dllama-run, chat, serve)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dllama.cli.edge import CliError, note
from dllama.formats import padded_vocabulary
from dllama.runtime.engine import Engine, keep_large_allocations_off_the_heap, release_freed_heap


@dataclass(frozen=True)
class ClusterOptions:
    """How the root of --workers splits the model (None workers: one node)."""

    workers: Optional[str] = None
    buffer_float_type: Optional[str] = None
    weights: Optional[str] = None
    root_compute: str = "all"
    cluster_key_file: Optional[Path] = None
    exchange: str = "mesh"


@dataclass
class LoadedModel:
    engine: Engine
    tokenizer: object


def model_files(source: Optional[str], model: Optional[Path], tokenizer: Optional[Path], quant: Optional[str] = None,
                with_tokenizer: bool = True):
    """MODEL (whatever the store resolves, converted once) or --model M.m [--tokenizer T.t] -> store.ModelFiles."""
    from dllama import store

    if source is not None and model is not None:
        raise CliError(f"give the model once: MODEL ({source}) or --model ({model}), not both")
    if source is None and model is None:
        raise CliError("name the model: MODEL (a hub id, a GGUF file, a checkpoint folder, a .m or a stored name: "
                       "dllama-run list), or --model M.m --tokenizer T.t")
    return store.resolve(str(source or model), quant, tokenizer, log=note, convert=source is not None,
                         with_tokenizer=with_tokenizer)


def check_port(host: str, port: int) -> None:
    """Refuse a taken address before anything loads (a model, a worker's slices): uvicorn or the worker would
    only find out after."""
    import socket

    try:
        socket.create_server((host, port)).close()  # SO_REUSEADDR as uvicorn's: only a listener in use counts
    except OSError as e:
        raise CliError(f"cannot listen on {host}:{port}: {e.strerror or e}; stop what is using it or choose another "
                       "--port") from None


def load_model(model: Path, tokenizer: Path, max_seq_len: int, nthreads: Optional[int],
               cluster: ClusterOptions = ClusterOptions(), slots: Optional[int] = 1) -> LoadedModel:
    """Engine (one node, or the root of a cluster) + tokenizer, checked against each other; `slots`: sequences
    the engine keeps a KV cache for (serve --parallel; on a cluster every node keeps its slice of each; None: what
    every node's free memory holds, a cluster's root decides as it connects)."""
    keep_large_allocations_off_the_heap()
    mpi_engine = None
    if cluster.workers == "@mpi":  # distributed.mpi.MPI_WORKERS (dllama-run mpi): ranks > 0 serve in here and exit
        from dllama.runtime.distributed.mpi import open_mpi_engine

        mpi_engine = open_mpi_engine(model, max_seq_len, nthreads, cluster.buffer_float_type, cluster.weights,
                                     cluster.root_compute, slots=slots)
    for path, what, ext in ((model, "model", "m"), (tokenizer, "tokenizer", "t")):
        if not Path(path).is_file():
            raise CliError(f"{what} file {path} does not exist: pass the converted .{ext} file")
    from dllama.tokenizer import Tokenizer

    tok = Tokenizer.load(str(tokenizer))
    engine = mpi_engine if mpi_engine is not None else _engine(model, max_seq_len, nthreads, cluster, slots)
    check_vocab(tok.vocab_size, engine.vocab_size, tokenizer, model)
    release_freed_heap()
    return LoadedModel(engine, tok)


def _engine(model: Path, max_seq_len: int, nthreads: Optional[int], cluster: ClusterOptions,
            slots: Optional[int] = 1) -> Engine:
    if cluster.workers:  # the same Engine interface, node 0 of a cluster
        from dllama.runtime.distributed.auth import load_cluster_key
        from dllama.runtime.distributed.root import DistributedEngine, parse_workers

        return DistributedEngine(model, parse_workers(cluster.workers), max_seq_len=max_seq_len, nthreads=nthreads,
                                 buffer_type=cluster.buffer_float_type, weights=cluster.weights,
                                 root_compute=cluster.root_compute,
                                 cluster_key=load_cluster_key(cluster.cluster_key_file), exchange=cluster.exchange,
                                 slots=slots)
    if cluster.weights is not None or cluster.root_compute != "all":
        raise CliError("--weights and --root-compute split the model over a cluster: add --workers host:port,...")
    return Engine.load(model, max_seq_len=max_seq_len, nthreads=nthreads, buffer_float_type=cluster.buffer_float_type,
                       slots=slots)


def check_vocab(tokenizer_vocab: int, model_vocab: int, tokenizer: Path, model: Path) -> None:
    if tokenizer_vocab != model_vocab and not padded_vocabulary(model_vocab, tokenizer_vocab):
        raise CliError(f"tokenizer {tokenizer} has {tokenizer_vocab} tokens but model {model} has a vocabulary of "
                       f"{model_vocab}: pass the .t converted from the same checkpoint as the .m")
