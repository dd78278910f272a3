"""How a model splits across nodes (FORMAT.md §3) and what each node must hold in memory.

`split_check` states the constraints with a fix; `slice_geometry` says which bytes of a stored
tensor belong to a node (the root streams exactly those); `memory_plan` sums each node's share
for `dllama-run plan`.
"""
from __future__ import annotations

from dataclasses import dataclass

from dllama.formats import BLOCK_FORMATS, BLOCK_SIZE, FloatType, ModelHeader, Split, TensorSpec, tensor_plan


class SplitError(ValueError):
    """The model cannot be split over the requested number of nodes."""


def split_check(h: ModelHeader, n_nodes: int) -> None:
    """Raise SplitError naming the first constraint of FORMAT.md §3 that `n_nodes` breaks."""
    if n_nodes < 1 or n_nodes & (n_nodes - 1):
        raise SplitError(f"{n_nodes} nodes: the node count (root + workers) must be a power of two (1, 2, 4, 8, ...)")
    if n_nodes > h.n_kv_heads:
        raise SplitError(f"{n_nodes} nodes but the model has only {h.n_kv_heads} kv heads: "
                         f"use at most {h.n_kv_heads} nodes (root + {h.n_kv_heads - 1} workers)")
    for name, size in (("q_dim", h.q_dim), ("kv_dim", h.kv_dim), ("hidden_dim", h.ffn_dim), ("vocab_size", h.vocab_size)):
        if size % n_nodes:
            raise SplitError(f"{name} {size} is not divisible by {n_nodes} nodes: use fewer nodes")
    if h.weights_float_type in (FloatType.Q40, FloatType.Q80):
        for name, size in (("wo", h.q_dim), ("w2", h.ffn_dim)):
            if (size // n_nodes) % BLOCK_SIZE:
                raise SplitError(f"{name} column slices of {size // n_nodes} values are not whole {BLOCK_SIZE}-value "
                                 f"blocks at {n_nodes} nodes: use fewer nodes")


@dataclass(frozen=True)
class SliceGeometry:
    """The bytes of one stored tensor that node `node` owns: `n_rows` runs of `run_bytes` bytes,
    starting `first_byte` into the tensor and `stride` bytes apart."""

    n_rows: int
    run_bytes: int
    first_byte: int
    stride: int

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.run_bytes


def row_bytes(spec: TensorSpec) -> int:
    fmt = BLOCK_FORMATS[spec.float_type]
    return spec.shape[-1] // fmt.values * fmt.nbytes


def slice_geometry(spec: TensorSpec, node: int, n_nodes: int) -> SliceGeometry:
    rows = spec.shape[0] if len(spec.shape) == 2 else 1
    rb = row_bytes(spec)
    if spec.split == Split.ROWS:
        per = rows // n_nodes  # a row block is contiguous in the file: one run
        return SliceGeometry(1, per * rb, node * per * rb, per * rb)
    if spec.split == Split.COLUMNS:
        per = rb // n_nodes
        return SliceGeometry(rows, per, node * per, rb)
    return SliceGeometry(1, spec.nbytes, 0, spec.nbytes)


def slice_shape(spec: TensorSpec, n_nodes: int) -> tuple[int, ...]:
    """Rows or columns of the node's share, as model.NodeSlice.share cuts them."""
    if spec.split == Split.ROWS:
        return (spec.shape[0] // n_nodes,) + tuple(spec.shape[1:])
    if spec.split == Split.COLUMNS:
        return spec.shape[0], spec.shape[1] // n_nodes
    return spec.shape


def worker_tensors(h: ModelHeader) -> list[tuple[int, TensorSpec]]:
    """(plan index, spec) of every tensor a worker holds: all but the embedding (the root looks up x)."""
    return [(i, s) for i, s in enumerate(tensor_plan(h)) if s.name != "embedding"]


# --------------------------------------------------------------------------------------------
# Memory per node

# The interpreter, numpy and the compiled kernels (compute.py), on any node: about 36 MiB
# (benchmarks/distributed.py on x86-64 Linux, docs/BENCHMARKS.md). Where the compiled kernels
# cannot be built the runtime runs numba's JIT kernels, and numba and LLVM bring it to ~165 MiB.
RUNTIME_BASE_BYTES = 36 * 1024 * 1024
# What the root's tokenizer holds per vocabulary entry (Hugging Face `tokenizers` with its merges,
# plus the .t vocabulary): Llama 2's 32000 tokens ~25 MiB (measured, docs/BENCHMARKS.md).
TOKENIZER_BYTES_PER_TOKEN = 800
KV_BYTES_PER_VALUE = 4  # f32 cache (FORMAT.md §3)


@dataclass(frozen=True)
class NodeMemory:
    node: int
    weights: int     # this node's slices (+ the norms everybody holds)
    kv_cache: int    # its kv heads' cache for max_seq_len positions
    buffers: int     # activations of one batch, exchange buffers, logits
    runtime: int     # interpreter, numpy, compiled kernels
    mapped_only: int # mapped but not resident (the root's embedding: only looked-up rows are read)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers + self.runtime


def node_weight_bytes(h: ModelHeader, n_nodes: int) -> int:
    total = 0
    for spec in tensor_plan(h):
        if spec.name == "embedding":
            continue
        total += slice_geometry(spec, 0, n_nodes).nbytes
    return total


def kv_cache_bytes(h: ModelHeader, n_nodes: int, max_seq_len: int) -> int:
    return 2 * h.n_layers * max_seq_len * (h.kv_dim // n_nodes) * KV_BYTES_PER_VALUE


def buffer_bytes(h: ModelHeader, n_nodes: int, max_seq_len: int, batch: int, is_root: bool) -> int:
    per_token = 4 * (
        3 * h.dim                              # x, normed x, summed partials
        + (h.q_dim + 2 * h.kv_dim) // n_nodes  # q, k, v of its heads
        + h.q_dim // n_nodes                   # attention output
        + (h.n_heads // n_nodes) * max_seq_len # attention scores
        + 3 * h.ffn_dim // n_nodes             # w1, w3 outputs and their product
        + n_nodes * h.dim                      # the partials of every node
    )
    logits = 4 * (h.vocab_size if is_root else h.vocab_size // n_nodes)
    return batch * (per_token + logits)


def memory_plan(h: ModelHeader, n_nodes: int, max_seq_len: int, batch: int = 1) -> list[NodeMemory]:
    split_check(h, n_nodes)
    embedding = h.vocab_size * h.dim * 4
    plan = []
    for node in range(n_nodes):
        plan.append(NodeMemory(
            node=node,
            weights=node_weight_bytes(h, n_nodes),
            kv_cache=kv_cache_bytes(h, n_nodes, max_seq_len),
            buffers=buffer_bytes(h, n_nodes, max_seq_len, batch, is_root=node == 0),
            runtime=RUNTIME_BASE_BYTES,
            mapped_only=embedding if node == 0 else 0,
        ))
    return plan


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
