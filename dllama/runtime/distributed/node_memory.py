"""What each node of a split must hold in memory (`dllama-run plan`), and the cluster's weights.

The split itself (who holds which rows, columns and heads) is dllama/runtime/split.py's; this
module sums each node's share of it, and reads `--weights` / `--root-compute`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dllama.formats import ModelHeader, TensorSpec, tensor_plan
from dllama.runtime.distributed.protocol import WEIGHT_CHUNK
from dllama.runtime.split import ClusterSplit, NodeShare, SliceGeometry, SplitError  # noqa: F401 (re-exported)

# A `dllama-run` process before its share of the model: the interpreter, numpy and the compiled
# kernels (dispatch.py, ~36 MiB) and its command line parser (typer, click and the pydantic typer
# imports, ~8 MiB). 42 MiB fits the measured peaks of 13 cluster shapes of two models within 8%
# (benchmarks/distributed.py, docs/BENCHMARKS.md). Where the compiled kernels cannot be built the
# runtime runs numba's JIT kernels, and numba and LLVM add ~130 MiB.
RUNTIME_BASE_BYTES = 42 * 1024 * 1024
DEFAULT_MAX_PARALLEL = 4  # serve's default --parallel: what every node's memory holds, at most this
# The root's tokenizer (dllama-run loads it; `plan --serve` counts it): the `tokenizers` library and its
# import (~7 MiB), then per vocabulary entry Hugging Face's vocabulary and merges and the .t's tokens and
# scores, after start-up gives the parse's garbage back (engine.release_freed_heap) and Tokenizer.load lets
# go of the tokenizer.json text. Measured: SmolLM2's 49152 tokens 24.2 MiB in all, TinyLlama's 32000
# 20.7 MiB, ~380 bytes a token (docs/BENCHMARKS-HISTORY.md, "The root's tokenizer text").
TOKENIZER_LIBRARY_BYTES = 7 * 1024 * 1024
TOKENIZER_BYTES_PER_TOKEN = 380
# `dllama-run serve` beside the runtime: its HTTP stack imported (uvicorn, starlette, prometheus_client and
# the pydantic models of the OpenAI API, ~17 MiB) and what serving takes while requests stream (their
# threads, Python objects and allocator arenas: ~9 MiB at 4 to 8 concurrent clients), measured on SmolLM2
# and the TinyLlama shape alike (docs/BENCHMARKS-HISTORY.md, issue 25 must-hold 4).
SERVER_BYTES = 26 * 1024 * 1024
KV_BYTES_PER_VALUE = 4  # f32 cache (FORMAT.md §3)
# The root streams each worker its slices through a read buffer of up to 4 MiB, and column slices
# through a row block and its columns (slices.stream_buffer_bytes): the allocator keeps those pages
# for the root's later use, so they add to its peak (and are most of a coordinator root's).
ROOT_COMPUTE_CHOICES = ("all", "none")


def cluster_weights(n_nodes: int, weights: str | None, root_compute: str = "all") -> tuple[float, ...]:
    """`--weights 2,1,1` and `--root-compute none` -> one weight per node (None: equal shares).
    "auto" is resolved at connect time by the root (root.py), not here."""
    if root_compute not in ROOT_COMPUTE_CHOICES:
        raise SplitError(f"--root-compute {root_compute!r}: use all (the root computes a share) or none (it only "
                         "coordinates: tokenizer, embedding, sampling, API)")
    if weights is None or weights.strip() == "":
        values = [1.0] * n_nodes
    else:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise SplitError(f"cannot read --weights {weights!r}: write one number per node, the root's first, "
                             "e.g. 2,1,1 (or auto)") from None
        if len(values) != n_nodes:
            raise SplitError(f"--weights {weights} gives {len(values)} weights for {n_nodes} nodes (root + "
                             f"{n_nodes - 1} workers): give one per node, the root's first")
        if any(not v > 0 for v in values):
            raise SplitError(f"--weights {weights}: every weight must be positive (a root that computes nothing is "
                             "--root-compute none)")
    if root_compute == "none":
        values[0] = 0.0
    return tuple(values)


def shard_tensors(h: ModelHeader, share: NodeShare) -> list[tuple[int, TensorSpec]]:
    """(plan index, spec) of every tensor node `share.node` holds as slices: all but the embedding
    (the root looks up x), nothing for a coordinator root."""
    return [(i, s) for i, s in enumerate(tensor_plan(h)) if s.name != "embedding" and share.holds(s)]


# --------------------------------------------------------------------------------------------
# Memory per node

@dataclass(frozen=True)
class NodeMemory:
    node: int
    share: NodeShare
    weights: int     # this node's slices (+ the norms every computing node holds)
    kv_cache: int    # its kv heads' cache for max_seq_len positions
    buffers: int     # activations of one batch, exchange buffers, logits
    runtime: int     # interpreter, numpy, compiled kernels
    mapped_only: int # mapped but not resident (the root's embedding: only looked-up rows are read)
    server: int = 0  # the root under `dllama-run serve`: its tokenizer and HTTP server (serving_bytes)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers + self.runtime + self.server


def node_weight_bytes(h: ModelHeader, share: NodeShare) -> int:
    return sum(share.geometry(spec).nbytes for _, spec in shard_tensors(h, share))


def kv_cache_bytes(h: ModelHeader, share: NodeShare, max_seq_len: int) -> int:
    return 2 * h.n_layers * max_seq_len * share.n_kv_heads * h.head_dim * KV_BYTES_PER_VALUE


def buffer_bytes(h: ModelHeader, split: ClusterSplit, share: NodeShare, max_seq_len: int, batch: int,
                 logit_rows: int | None = None) -> int:
    """Activations of a `batch`, and `logit_rows` rows of logits (default: one per token of the batch). dllama-run's
    logits buffer is calloc'ed outside the heap (engine.keep_large_allocations_off_the_heap), so only the rows
    written become resident: serve's root writes one per sequence that samples in a step, at most --parallel."""
    _, padded_heads = share.attention_layout
    ffn = share.ffn[1] - share.ffn[0]
    per_token = 4 * (
        3 * h.dim                                              # x, normed x, summed partials
        + (share.n_heads + 2 * share.n_kv_heads) * h.head_dim  # q, k, v of its heads
        + padded_heads * h.head_dim                            # attention output
        + padded_heads * max_seq_len                           # attention scores
        + 3 * ffn                                              # w1, w3 outputs and their product
        + len(split.computing) * h.dim                         # the partials of every node
    )
    logits = 4 * (h.vocab_size if share.node == 0 else share.vocab[1] - share.vocab[0])
    rows = batch if logit_rows is None else min(batch, logit_rows)
    return batch * per_token + rows * logits + (streaming_bytes(h, split) if share.node == 0 else 0)


def streaming_bytes(h: ModelHeader, split: ClusterSplit) -> int:
    """What streaming every worker its slices leaves in the root: the buffers are freed, but the
    allocator keeps about one read buffer's pages (measured), the largest a slice needs up to 4 MiB."""
    from dllama.runtime.distributed.slices import stream_buffer_bytes

    largest = max((stream_buffer_bytes(share.geometry(spec)) for share in split.nodes[1:]
                   for _, spec in shard_tensors(h, share)), default=0)
    return min(largest, WEIGHT_CHUNK)


def tokenizer_bytes(h: ModelHeader) -> int:
    return TOKENIZER_LIBRARY_BYTES + TOKENIZER_BYTES_PER_TOKEN * h.vocab_size


def serving_bytes(h: ModelHeader) -> int:
    """What `dllama-run serve` adds to its root's runtime: the tokenizer and the HTTP server."""
    return tokenizer_bytes(h) + SERVER_BYTES


def memory_plan(h: ModelHeader, n_nodes: int, max_seq_len: int, batch: int = 1,
                weights: tuple[float, ...] | None = None, parallel: int = 1, serve: bool = False) -> list[NodeMemory]:
    """Each node's memory; `parallel` sequences at once (serve --parallel) hold a KV cache each; `serve`: the
    root runs `dllama-run serve` (its tokenizer and HTTP server count too)."""
    split = ClusterSplit.plan(h, n_nodes, weights)
    embedding = h.vocab_size * h.dim * 4
    return [NodeMemory(
        node=share.node,
        share=share,
        weights=node_weight_bytes(h, share),
        kv_cache=parallel * kv_cache_bytes(h, share, max_seq_len),
        buffers=buffer_bytes(h, split, share, max_seq_len, batch, parallel if serve and share.node == 0 else None),
        runtime=RUNTIME_BASE_BYTES,
        mapped_only=embedding if share.node == 0 else 0,
        server=serving_bytes(h) if serve and share.node == 0 else 0,
    ) for share in split.nodes]


def parallel_that_fits(h: ModelHeader, max_seq_len: int, available: Sequence[int], batch: int, most: int,
                       weights: tuple[float, ...] | None = None) -> int:
    """How many sequences a node, or every node of a cluster, can serve at once (serve's default --parallel):
    each one's KV cache (a cluster node's slice of it) beside the node's weights, the buffers of a `batch`, the
    runtime and (the root) the server, in each node's `available` bytes (root first; one entry for one node);
    1 to `most`."""
    plans = memory_plan(h, len(available), max_seq_len, batch, weights, serve=True)
    fits = [(free - (m.weights + m.buffers + m.runtime + m.server)) // max(m.kv_cache, 1)
            for m, free in zip(plans, available, strict=True)]
    return max(1, min(most, *fits))


def parse_size(text: str) -> int:
    """'1G', '512M', '800k', '1.5GB' or a plain byte count -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t))
    except ValueError:
        raise SplitError(f"cannot read the size {text!r}: write it like 1G, 512M or 1073741824") from None
