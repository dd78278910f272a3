"""Who computes what on a cluster: the one owner of the tensor-parallel split (FORMAT.md §3, generalised).

    split = ClusterSplit.plan(header, 3)                     # 3 nodes, equal shares
    split = ClusterSplit.plan(header, 3, weights=(2, 1, 1))  # mixed boards: node 0 does half
    split = ClusterSplit.plan(header, 3, weights=(0, 1, 1))  # a coordinator root (--root-compute none)
    share = split.nodes[i]           # node i's query heads, kv heads, FFN rows, vocabulary rows
    share.tensor_range(spec)         # (start, stop) rows or columns of `spec` it holds, None if whole
    share.geometry(spec)             # where those bytes lie inside the stored tensor

Query heads, FFN rows and vocabulary rows are each cut into contiguous groups in proportion to the
weights (largest remainder; a computing node gets at least one unit of each). A node computes every
kv head its query heads read, so a kv head whose query heads fall on two nodes is computed by both
(replicated K/V): with more nodes than kv heads, or head groups that do not line up with the kv
groups, every node still holds whole heads. With equal weights and counts that divide evenly this
is exactly the reference's split (node i owns rows [i * d/n, (i+1) * d/n)).

Units keep quantized slices whole: wo's and w2's column slices must be whole 32-value blocks, so
with q40/q80 weights a head unit is as many heads as fill whole blocks (one head for head_dim 64)
and an FFN unit is 32 rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dllama.errors import DllamaError
from dllama.formats import BLOCK_FORMATS, BLOCK_SIZE, FloatType, ModelHeader, Split, TensorSpec


class SplitError(DllamaError, ValueError):
    """The model cannot be split as asked; the message names the node counts that work."""


@dataclass(frozen=True)
class SliceGeometry:
    """The bytes of one stored tensor a node holds: `n_rows` runs of `run_bytes` bytes, starting
    `first_byte` into the tensor and `stride` bytes apart (one run for whole tensors and row slices)."""

    n_rows: int
    run_bytes: int
    first_byte: int
    stride: int

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.run_bytes


# which range of a node's share cuts each split tensor, and how many rows/columns one unit of it is
_RANGE_OF = {"q": "heads", "wo": "heads", "k": "kv_heads", "v": "kv_heads",
             "w1": "ffn", "w2": "ffn", "w3": "ffn", "lm_head": "vocab"}


def row_bytes(spec: TensorSpec) -> int:
    fmt = BLOCK_FORMATS[spec.float_type]
    return spec.shape[-1] // fmt.values * fmt.nbytes


@dataclass(frozen=True)
class NodeShare:
    """Node `node`'s contiguous [start, stop) of query heads, kv heads, FFN rows and vocabulary rows."""

    node: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]
    head_dim: int
    kv_group: int  # query heads per kv head in the model

    @property
    def computes(self) -> bool:
        """False for a coordinator root: it holds no layer slices and adds no partials."""
        return self.heads[1] > self.heads[0]

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def attention_layout(self) -> tuple[int, int]:
        """(offset, padded heads): where the node's query heads sit among the heads the attention
        kernel runs so that head h reads kv head h // (padded / n_kv_heads), as it assumes.

        Aligned groups (and a single kv head) need no padding; a group cut by a node boundary is
        padded with unused heads up to a whole kv group."""
        if self.n_kv_heads <= 1:
            return 0, self.n_heads
        return self.heads[0] - self.kv_heads[0] * self.kv_group, self.n_kv_heads * self.kv_group

    def describe(self) -> str:
        if not self.computes:
            return "coordinates only (no layer slices)"
        return (f"heads {_span(self.heads)} (kv {_span(self.kv_heads)}), "
                f"ffn rows {_span(self.ffn)}, vocab rows {_span(self.vocab)}")

    def tensor_range(self, spec: TensorSpec) -> tuple[int, int] | None:
        """Rows (Split.ROWS) or columns (Split.COLUMNS) of `spec` this node holds; None: all of it."""
        if spec.split == Split.WHOLE:
            return None
        kind = _RANGE_OF[spec.name.rsplit(".", 1)[-1]]
        start, stop = getattr(self, kind)
        scale = self.head_dim if kind in ("heads", "kv_heads") else 1
        return start * scale, stop * scale

    def geometry(self, spec: TensorSpec) -> SliceGeometry:
        rb = row_bytes(spec)
        rows = spec.shape[0] if len(spec.shape) == 2 else 1
        span = self.tensor_range(spec)
        if span is None:
            return SliceGeometry(1, spec.nbytes, 0, spec.nbytes)
        start, stop = span
        if spec.split == Split.ROWS:  # a row block is contiguous in the file: one run
            return SliceGeometry(1, (stop - start) * rb, start * rb, (stop - start) * rb)
        per_value = rb // spec.shape[1] if spec.float_type == FloatType.F32 else None
        b0, b1 = (start * per_value, stop * per_value) if per_value else _block_bytes(spec, start, stop)
        return SliceGeometry(rows, b1 - b0, b0, rb)

    def slice_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        span = self.tensor_range(spec)
        if span is None:
            return spec.shape
        if spec.split == Split.ROWS:
            return (span[1] - span[0],) + tuple(spec.shape[1:])
        return spec.shape[0], span[1] - span[0]

    def holds(self, spec: TensorSpec) -> bool:
        """Every computing node holds its slices and the whole small tensors; the embedding is the root's."""
        if spec.name == "embedding":
            return self.node == 0
        return self.computes


def _span(r: tuple[int, int]) -> str:
    """[start, stop) as the inclusive "first-last" a person reads."""
    return f"{r[0]}-{r[1] - 1}"


def _block_bytes(spec: TensorSpec, start: int, stop: int) -> tuple[int, int]:
    fmt = BLOCK_FORMATS[spec.float_type]
    if start % fmt.values or stop % fmt.values:
        raise SplitError(f"{spec.name} columns [{start}, {stop}) do not fall on {fmt.values}-value block boundaries")
    return start // fmt.values * fmt.nbytes, stop // fmt.values * fmt.nbytes


@dataclass(frozen=True)
class Units:
    """How finely this model can be cut: query heads per unit, FFN rows per unit, and the unit counts."""

    head: int
    ffn: int
    n_heads: int
    n_ffn: int
    n_vocab: int

    @classmethod
    def of(cls, h: ModelHeader) -> "Units":
        quantized = h.weights_float_type in (FloatType.Q40, FloatType.Q80)
        head = 1
        while quantized and (head * h.head_dim) % BLOCK_SIZE:
            head += 1
        ffn = BLOCK_SIZE if quantized else 1
        return cls(head, ffn, h.n_heads // head, h.ffn_dim // ffn, h.vocab_size)

    @property
    def max_computing_nodes(self) -> int:
        return min(self.n_heads, self.n_ffn, self.n_vocab)


def proportional(total: int, weights: Sequence[float]) -> list[int]:
    """`total` units over the nodes in proportion to `weights` (largest remainder, ties to the lower
    node); none for a zero weight, and at least one for a positive weight (taken from the largest)."""
    wsum = sum(w for w in weights if w > 0)
    ideal = [total * w / wsum if w > 0 else 0.0 for w in weights]
    counts = [int(x) for x in ideal]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    for i, w in enumerate(weights):
        if w > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda k: (counts[k], -weights[k], k))
            counts[donor] -= 1
            counts[i] = 1
    return counts


def _ranges(counts: list[int], scale: int) -> list[tuple[int, int]]:
    out, at = [], 0
    for c in counts:
        out.append((at * scale, (at + c) * scale))
        at += c
    return out


def works_text(h: ModelHeader, coordinator: bool = False) -> str:
    """The node counts that work for this model, as a user would type them."""
    top = Units.of(h).max_computing_nodes + (1 if coordinator else 0)
    low = 2 if coordinator else 1
    return f"{low} to {top} nodes" if top > low else f"{low} node{'s' if low > 1 else ''}"


@dataclass(frozen=True)
class ClusterSplit:
    n_nodes: int
    weights: tuple[float, ...]
    nodes: tuple[NodeShare, ...]

    @classmethod
    def plan(cls, h: ModelHeader, n_nodes: int, weights: Sequence[float] | None = None) -> "ClusterSplit":
        """The split of `h` over `n_nodes` (root = node 0); raises SplitError naming what works."""
        weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * n_nodes))
        check_weights(h, n_nodes, weights)
        units = Units.of(h)
        heads = _ranges(proportional(units.n_heads, weights), units.head)
        ffn = _ranges(proportional(units.n_ffn, weights), units.ffn)
        vocab = _ranges(proportional(units.n_vocab, weights), 1)
        group = h.n_heads // h.n_kv_heads
        nodes = []
        for i in range(n_nodes):
            h0, h1 = heads[i]
            kv = (h0 // group, (h1 - 1) // group + 1) if h1 > h0 else (0, 0)
            nodes.append(NodeShare(i, heads[i], kv, ffn[i], vocab[i], h.head_dim, group))
        return cls(n_nodes, weights, tuple(nodes))

    @property
    def computing(self) -> list[int]:
        return [s.node for s in self.nodes if s.computes]


def check_weights(h: ModelHeader, n_nodes: int, weights: tuple[float, ...]) -> None:
    coordinator = len(weights) > 0 and weights[0] == 0
    if n_nodes < 1:
        raise SplitError(f"{n_nodes} nodes: a cluster has at least the root")
    if len(weights) != n_nodes:
        raise SplitError(f"{len(weights)} weights for {n_nodes} nodes: give one weight per node, the root's first")
    if any(w < 0 or w != w or w == float("inf") for w in weights) or any(w <= 0 for w in weights[1:]):
        raise SplitError(f"weights {_fmt(weights)}: every worker needs a positive weight (only the root may compute "
                         "nothing, with --root-compute none)")
    if coordinator and n_nodes == 1:
        raise SplitError("a root that computes nothing needs at least one worker: add --workers")
    if h.n_kv_heads < 1 or h.n_heads % h.n_kv_heads:
        raise SplitError(f"the model's {h.n_heads} heads are not a multiple of its {h.n_kv_heads} kv heads")
    units = Units.of(h)
    computing = sum(1 for w in weights if w > 0)
    if computing > units.max_computing_nodes:
        ffn = f"{h.ffn_dim} FFN rows" + (f" in blocks of {units.ffn}" if units.ffn > 1 else "")
        why = (f"{h.n_heads} heads" if units.n_heads == units.max_computing_nodes
               else ffn if units.n_ffn == units.max_computing_nodes else f"{h.vocab_size} vocabulary rows")
        if units.head > 1 and units.n_heads == units.max_computing_nodes:
            why = f"{h.n_heads} heads in groups of {units.head} (whole {BLOCK_SIZE}-value blocks of wo)"
        raise SplitError(f"{n_nodes} nodes ({computing} computing) is more than this model's {why} allow: "
                         f"it runs on {works_text(h, coordinator)}{' with a coordinator root' if coordinator else ''}")


def _fmt(weights: Sequence[float]) -> str:
    return ",".join(f"{w:g}" for w in weights)
