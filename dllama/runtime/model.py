"""One node's share of the forward pass (FORMAT.md §2), parameterised for tensor parallelism (§3).

A `split.NodeShare` names the node's share (dllama/runtime/split.py owns the geometry): whole
query heads and the kv heads they read (and their KV cache), rows of w1/w3/lm_head, columns of
wo/w2. `NodeLayers` computes, per layer, the node's partial `dim` vector after wo (`attention`)
and after w2 (`ffn`), and its slice of the logits (`logits`); a node with no share (a
coordinator root) returns None for both partials. Summing partials across nodes and gathering
logits is not done here: that is the exchange's job (engine.py), so the single-node engine is
simply a one-node split.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dllama.formats import FloatType, ModelFile, ModelHeader, RopeType, Split
from dllama.runtime import dispatch
from dllama.runtime.split import ClusterSplit, NodeShare
from dllama.runtime.tensors import Matrix, release_pages


def whole_model_share(h: ModelHeader) -> NodeShare:
    """Everything: the share of the only node of a one-node run."""
    return ClusterSplit.plan(h, 1).nodes[0]


@dataclass
class Expert:
    w1: Matrix
    w2: Matrix
    w3: Matrix


@dataclass
class LayerWeights:
    """A node's weights for one layer; matrices are already cut to the node's slice."""

    q: Matrix
    k: Matrix
    v: Matrix
    wo: Matrix
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    w1: Matrix | None = None  # dense FFN
    w2: Matrix | None = None
    w3: Matrix | None = None
    gate: np.ndarray | None = None  # moe: (n_experts, dim) float32, whole on every node
    experts: list[Expert] = field(default_factory=list)
    q_norm: np.ndarray | None = None  # qwen3
    k_norm: np.ndarray | None = None


@dataclass
class NodeWeights:
    layers: list[LayerWeights]
    norm: np.ndarray
    lm_head: Matrix  # this node's rows of the vocabulary


def assemble_node_weights(h: ModelHeader, matrix: Callable[[str], Matrix],
                          vector: Callable[[str], np.ndarray]) -> NodeWeights:
    """A node's weights by tensor name (FORMAT.md §1.3): `matrix(name)` gives its slice of a split
    matrix (made ready for the kernels here, Matrix.for_kernels), `vector(name)` a whole tensor (norms,
    moe gate)."""
    stored = matrix

    def matrix(name: str) -> Matrix:
        return stored(name).for_kernels()

    layers = []
    for layer in range(h.n_layers):
        p = f"layers.{layer}."
        lw = LayerWeights(q=matrix(p + "q"), k=matrix(p + "k"), v=matrix(p + "v"), wo=matrix(p + "wo"),
                          attn_norm=vector(p + "attn_norm"), ffn_norm=vector(p + "ffn_norm"))
        if h.is_moe:
            lw.gate = vector(p + "gate")
            lw.experts = [Expert(*(matrix(f"{p}experts.{e}.{w}") for w in ("w1", "w2", "w3")))
                          for e in range(h.n_experts)]
        else:
            lw.w1, lw.w2, lw.w3 = matrix(p + "w1"), matrix(p + "w2"), matrix(p + "w3")
        if h.has_qk_norm:
            lw.q_norm, lw.k_norm = vector(p + "q_norm"), vector(p + "k_norm")
        layers.append(lw)
    return NodeWeights(layers=layers, norm=vector("norm"), lm_head=matrix("lm_head"))


def load_node_weights(model: ModelFile, share: NodeShare | None = None) -> NodeWeights:
    """The node's slices of every tensor in the memory-mapped file, copied for the kernels (Matrix.for_kernels;
    f32 matrices stay views) and the vectors copied, so the map's pages can leave the process: a page read
    through it later would map its neighbours (and its page cache folio) back in."""
    share = share or whole_model_share(model.header)

    def matrix(name: str) -> Matrix:
        spec = model.layout[name].spec
        whole = Matrix.from_file(model, name)
        span = share.tensor_range(spec)
        if span is None:
            return whole
        return whole.row_slice(*span) if spec.split == Split.ROWS else whole.column_slice(*span)

    weights = assemble_node_weights(model.header, matrix, lambda name: np.array(model.blocks(name)))
    if model.header.weights_float_type != FloatType.F32:
        release_pages(model.data)
    return weights


# --------------------------------------------------------------------------------------------
# The blocks

# The small elementwise stages compute in float64 and round to float32 once at their output:
# a last-bit difference before a q80 rounding would flip a quantized value (a whole step of
# amax/127), so the runtime's result should not depend on the summation order of these stages.

def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight).astype(np.float32)


def silu_gate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """silu(a) * b, the FFN's hidden activation (float64 inside, dispatch.silu_gate)."""
    out = np.empty(a.shape, dtype=np.float32)
    dispatch.silu_gate(np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32), out)
    return out


def rope_frequencies(h: ModelHeader) -> np.ndarray:
    """theta^(-2i/head_dim), with Llama 3.1 scaling when the header asks for it (FORMAT.md §2)."""
    hd = h.head_dim
    freqs = 1.0 / h.theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    if h.effective_rope_type != RopeType.LLAMA3_1:
        return freqs
    factor = float(h.rope_scaling_factor or 1)
    low = float(h.rope_scaling_low_freq_factor or 1)
    high = float(h.rope_scaling_high_freq_factor or 4)
    orig = float(h.rope_scaling_orig_max_seq_len or h.max_seq_len)
    wavelen = 2 * math.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return np.where(wavelen < orig / high, freqs, np.where(wavelen > orig / low, freqs / factor, blended))


class Rope:
    """Rotations for positions [0, max_seq_len): llama pairs (2i, 2i+1), falcon (i, i + hd/2)."""

    def __init__(self, h: ModelHeader, max_seq_len: int):
        angles = np.arange(max_seq_len, dtype=np.float64)[:, None] * rope_frequencies(h)[None, :]
        self.cos = np.cos(angles)
        self.sin = np.sin(angles)
        self.falcon = h.effective_rope_type == RopeType.FALCON

    def __call__(self, x: np.ndarray, pos: int) -> np.ndarray:
        """x (T, heads, hd) at positions pos.. -> rotated float32 copy."""
        T, _, hd = x.shape
        x = x.astype(np.float64)
        cos = self.cos[pos:pos + T, None, :]
        sin = self.sin[pos:pos + T, None, :]
        if self.falcon:
            a, b = x[..., :hd // 2], x[..., hd // 2:]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(np.float32)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty(x.shape, dtype=np.float32)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out


@dataclass(frozen=True)
class Places:
    """Where a batch's tokens go in the KV cache: token t at position positions[t] of slot slots[t] (each
    slot, a sequence, has its own max_seq_len rows). A token attends to its slot's positions up to its own."""
    positions: np.ndarray  # (T,) int64
    slots: np.ndarray      # (T,) int64

    @staticmethod
    def of(pos: "int | Places", n_tokens: int) -> "Places":
        """`pos` as Places: an int is n_tokens consecutive positions from pos in slot 0."""
        if isinstance(pos, Places):
            return pos
        return Places(np.arange(pos, pos + n_tokens, dtype=np.int64), np.zeros(n_tokens, np.int64))

    def runs(self) -> list[tuple[int, int, int, int]]:
        """(slot, first position, first row, end row): the maximal stretches of rows at consecutive positions
        of one slot, in row order."""
        out = []
        start = 0
        for t in range(1, len(self.positions) + 1):
            if (t == len(self.positions) or self.slots[t] != self.slots[start]
                    or self.positions[t] != self.positions[t - 1] + 1):
                out.append((int(self.slots[start]), int(self.positions[start]), start, t))
                start = t
        return out


class NodeLayers:
    """The node's per-layer computations and its slice of the KV cache: `slots` regions of max_seq_len
    positions each (one per sequence a batch may carry; slot 0 is the one of forward(ids, pos))."""

    def __init__(self, h: ModelHeader, weights: NodeWeights | None, share: NodeShare, max_seq_len: int,
                 slots: int = 1):
        self.h, self.w, self.share = h, weights, share
        self.max_seq_len, self.slots = max_seq_len, slots
        self.heads = share.n_heads
        self.kv_heads = share.n_kv_heads
        self.head_offset, self.padded_heads = share.attention_layout
        self.has_ffn = share.ffn[1] > share.ffn[0]
        self.has_vocab = share.vocab[1] > share.vocab[0]
        self.eps = h.norm_epsilon
        self.rope = Rope(h, max_seq_len)
        # each kv head's positions side by side: attention reads one head's rows as one stream
        cache_shape = (h.n_layers, slots, self.kv_heads, max_seq_len, h.head_dim)
        self.k_cache, self.v_cache = (lazy_zeros(cache_shape, np.float32) for _ in range(2))
        self._compiled: CompiledPass | None | bool = False  # False: not decided yet

    def compiled(self) -> "CompiledPass | None":
        """The node's pass as compiled programs, where they cover its weights (else None: the per-call path)."""
        if self._compiled is False:
            self._compiled = CompiledPass(self) if CompiledPass.covers(self) else None
        return self._compiled

    def prepare_whole_pass(self, batch: int, q80_partials: bool = False) -> None:
        """Build now the programs every generation runs (a token, and a full batch of a prompt without its
        logits) rather than while a first prompt waits; no-op without compiled programs."""
        if (compiled := self.compiled()) is not None:
            adds = whole_pass_adds(q80_partials)
            for key in ((1, adds, "all"), (min(batch, MAX_BATCH), adds, "none")):
                compiled.program(*key)

    def whole_pass(self, x: np.ndarray, pos: "int | Places", out: np.ndarray | None = None,
                   logits: "str | int" = "all", q80_partials: bool = False) -> np.ndarray | None:
        """Every layer and the logits for one node whose partials are added as computed (engine.LocalExchange),
        each rounded through q80 first with `q80_partials`: x (T, dim) -> the logits of every token, the last
        or none (CompiledPass.whole), written into `out` when given (else valid until the next call), x
        updated; None without compiled programs."""
        compiled = self.compiled()
        return None if compiled is None else compiled.whole(x, pos, out, logits, q80_partials)

    @property
    def kv_cache_bytes(self) -> int:
        return self.k_cache.nbytes + self.v_cache.nbytes

    def attention_block(self, layer: int, x: np.ndarray, pos: "int | Places") -> np.ndarray | None:
        """x (T, dim) residual stream -> the node's partial after wo (None: the node has no heads)."""
        if not self.heads:
            return None
        if compiled := self.compiled():
            return compiled.stretch(f"attention {layer}", x, pos)
        return self.attention(layer, rmsnorm(x, self.w.layers[layer].attn_norm, self.eps), pos)

    def ffn_block(self, layer: int, x: np.ndarray) -> np.ndarray | None:
        """x (T, dim) residual stream -> the node's partial after w2 (None: the node has no FFN rows)."""
        if not self.has_ffn:
            return None
        if compiled := self.compiled():
            return compiled.stretch(f"ffn {layer}", x, 0)
        return self.ffn(layer, rmsnorm(x, self.w.layers[layer].ffn_norm, self.eps))

    def attention(self, layer: int, y: np.ndarray, pos: "int | Places") -> np.ndarray | None:
        """y (T, dim) normed input at positions pos.. (or its Places) -> the node's partial Wo z (T, dim); None
        without heads."""
        if not self.heads:
            return None
        lw = self.w.layers[layer]
        T, hd = y.shape[0], self.h.head_dim
        x_in = lw.q.prepare(y)
        q = (lw.q @ x_in).reshape(T, self.heads, hd)
        k = (lw.k @ x_in).reshape(T, self.kv_heads, hd)
        v = (lw.v @ x_in).reshape(T, self.kv_heads, hd)
        if lw.q_norm is not None:
            q = rmsnorm(q, lw.q_norm, self.eps)
            k = rmsnorm(k, lw.k_norm, self.eps)
        z = np.empty((T, self.heads * hd), dtype=np.float32)
        for slot, p, r0, r1 in Places.of(pos, T).runs():  # in row order: a later run sees an earlier one's cache
            k_cache, v_cache = self.k_cache[layer, slot], self.v_cache[layer, slot]  # (kv heads, positions, hd)
            k_cache[:, p:p + r1 - r0] = self.rope(k[r0:r1], p).transpose(1, 0, 2)
            v_cache[:, p:p + r1 - r0] = v[r0:r1].transpose(1, 0, 2)
            z[r0:r1] = self._attend(k_cache, v_cache, self.rope(q[r0:r1], p), p)
        return lw.wo @ lw.wo.prepare(z)

    def _attend(self, k_cache: np.ndarray, v_cache: np.ndarray, q: np.ndarray, pos: int) -> np.ndarray:
        """softmax(q k) v for the node's query heads (T, heads * hd). The kernel maps head h to kv head
        h // (heads / kv heads); a node whose heads cut a kv group runs them among unused padding heads."""
        T, hd, off = q.shape[0], self.h.head_dim, self.head_offset
        if self.padded_heads != self.heads:
            padded = np.zeros((T, self.padded_heads, hd), dtype=np.float32)
            padded[:, off:off + self.heads] = q
            q = padded
        z = np.empty((T, self.padded_heads * hd), dtype=np.float32)
        dispatch.attention(np.ascontiguousarray(q), k_cache, v_cache, pos, z)
        return z if self.padded_heads == self.heads else np.ascontiguousarray(z[:, off * hd:(off + self.heads) * hd])

    def ffn(self, layer: int, y: np.ndarray) -> np.ndarray | None:
        """y (T, dim) normed input -> the node's partial FFN output (T, dim); None without FFN rows."""
        if not self.has_ffn:
            return None
        lw = self.w.layers[layer]
        if lw.gate is None:
            return self._ffn(lw.w1, lw.w2, lw.w3, lw.w1.prepare(y))
        return self._moe(lw, y)

    @staticmethod
    def _ffn(w1: Matrix, w2: Matrix, w3: Matrix, x_in) -> np.ndarray:
        hidden = silu_gate(w1 @ x_in, w3 @ x_in)  # the reference always uses silu (FORMAT.md §2)
        return w2 @ w2.prepare(hidden)

    def _moe(self, lw: LayerWeights, y: np.ndarray) -> np.ndarray:
        """softmax gate, top n_active experts, weights renormalised (FORMAT.md §2)."""
        T = y.shape[0]
        probs = softmax(y.astype(np.float64) @ lw.gate.T)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :self.h.n_active_experts]
        top_p = np.take_along_axis(probs, top, axis=-1)
        weights = top_p / top_p.sum(axis=-1, keepdims=True)
        out = np.zeros((T, self.h.dim), dtype=np.float64)
        for e in np.unique(top):
            tokens, slot = np.nonzero(top == e)
            ex = lw.experts[e]
            partial = self._ffn(ex.w1, ex.w2, ex.w3, ex.w1.prepare(y[tokens]))
            out[tokens] += weights[tokens, slot][:, None] * partial
        return out.astype(np.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """x (T, dim) after the last layer -> the node's slice of the logits (T, its vocabulary rows)."""
        if not self.has_vocab:
            return np.empty((x.shape[0], 0), dtype=np.float32)
        if compiled := self.compiled():
            return compiled.stretch("logits", x, 0, output="logits")
        y = rmsnorm(x, self.w.norm, self.eps)
        return self.w.lm_head @ self.w.lm_head.prepare(y)


# --------------------------------------------------------------------------------------------
# The compiled pass: the same blocks as dispatch.Program tables (kernels/program.py)

WEIGHT_KINDS = {FloatType.F32: dispatch.W_F32, FloatType.Q40: dispatch.W_Q40, FloatType.Q80: dispatch.W_Q80}
MAX_BATCH = 64  # engine.PREFILL_BATCH: tokens per program run (a longer input runs in several)
STEP_PROGRAMS = 24  # a step's programs kept (each a table of ~10 ops per layer); others are built again
LM_HEAD_OUT = 6  # the out slot of an OP_MATMUL (kernels/program.py _op_matmul)
LOGITS_ROWS = {"all": lambda T: T, "last": lambda T: 1, "none": lambda T: 0}  # whole(logits=): rows computed


def logit_rows(logits: "str | int", T: int) -> int:
    """How many of T tokens' logits `logits` asks for: a LOGITS_ROWS name, or a count of last rows (a step)."""
    return LOGITS_ROWS[logits](T) if isinstance(logits, str) else logits


def whole_pass_adds(q80_partials: bool) -> int:
    """How a whole pass adds each partial into x: as computed, or rounded through q80 first."""
    return dispatch.ADD_Q80 if q80_partials else dispatch.ADD


class CompiledPass:
    """A node's blocks as compiled programs, per batch size: each stretch between two exchange points
    (rmsnorm -> q80 -> q, k, v -> rope, KV cache -> attention -> q80 -> wo; rmsnorm -> q80 -> w1, w3 ->
    silu * gate -> q80 -> w2; final rmsnorm -> lm_head) is one call on the node's threads, and so is the
    whole token on a node whose partials are added as computed (residual adds fused into wo and w2).
    It covers dense llama-style layers without q/k norms, whole kv groups and contiguous weights of one
    float type; MoE, qwen3's q/k norms and a split kv group run the per-call blocks of NodeLayers."""

    @staticmethod
    def covers(layers: NodeLayers) -> bool:
        h, w = layers.h, layers.w
        if not dispatch.runs_programs() or w is None or h.is_moe or h.has_qk_norm:
            return False
        if not (layers.heads and layers.has_ffn and layers.has_vocab) or layers.padded_heads != layers.heads:
            return False
        matrices = [m for lw in w.layers for m in (lw.q, lw.k, lw.v, lw.wo, lw.w1, lw.w2, lw.w3)]
        kinds = {m.float_type for m in matrices}
        return (len(kinds) == 1 and all(m.data.flags.c_contiguous for m in matrices + [w.lm_head])
                and w.lm_head.float_type in WEIGHT_KINDS and h.head_dim % 2 == 0)

    def __init__(self, layers: NodeLayers):
        self.n = layers
        h, w = layers.h, layers.w
        B, dim, hd = MAX_BATCH, h.dim, h.head_dim
        self.quantized = w.layers[0].q.quantized
        q_dim, kv_dim, hidden = layers.heads * hd, layers.kv_heads * hd, w.layers[0].w1.shape[0]
        f32, n_threads = np.float32, dispatch.max_threads()
        self.x, self.y, self.partial = (np.zeros((B, dim), f32) for _ in range(3))
        self.q, self.z = np.zeros((B, q_dim), f32), np.zeros((B, q_dim), f32)
        self.k, self.v = np.zeros((B, kv_dim), f32), np.zeros((B, kv_dim), f32)
        self.h1, self.h3 = np.zeros((B, hidden), f32), np.zeros((B, hidden), f32)
        self.logits = np.zeros((B, w.lm_head.shape[0]), f32)
        self.squares = np.zeros(n_threads * dim, np.float64)
        self.eps = np.array([layers.eps], np.float64)
        self.xq, self.zq, self.hq = (q80_buffers(B, n) for n in (dim, q_dim, hidden))
        self.positions, self.slots = np.zeros(B, np.int64), np.zeros(B, np.int64)  # each token's: rope, attention
        # programs by (tokens, adds: 0 for stretches, else whole_pass_adds, logits: a LOGITS_ROWS name, or a count
        # of last rows for a step's, the most recent STEP_PROGRAMS of those kept)
        self.programs: dict[tuple[int, int, str | int], dispatch.Program] = {}
        self.lm_head_ops: dict[tuple[int, int, str], int] = {}  # each program's lm_head op
        self.logits_home: dict[tuple[int, int, str], np.ndarray] = {}  # each lm_head op's rows of self.logits
        self.logits_target: dict[tuple[int, int, str], np.ndarray] = {}  # where it writes now (home, or an `out`)

    def stretch(self, name: str, x: np.ndarray, pos: "int | Places", output: str = "partial") -> np.ndarray:
        """One exchange-to-exchange stretch ("attention L", "ffn L", "logits") on x (T, dim): a new array.
        More than MAX_BATCH tokens run MAX_BATCH at a time (the later ones see the earlier ones' KV cache)."""
        parts = []
        for start in range(0, x.shape[0], MAX_BATCH):
            chunk = x[start:start + MAX_BATCH]
            T = chunk.shape[0]
            self.x[:T] = chunk
            self._place(pos, start, T)
            self.program(T, 0).run(name, 0)
            parts.append(getattr(self, output)[:T].copy())
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def whole(self, x: np.ndarray, pos: "int | Places", out: np.ndarray | None = None, logits: "str | int" = "all",
              q80_partials: bool = False) -> np.ndarray:
        """The whole pass on x (T, dim): the logits of every token, of the last one only (a prompt), or of none
        (LOGITS_ROWS), written straight into `out` (those rows, vocab) when it can take them (no second
        logits array at the peak of a prefill), else into this pass's buffer. `q80_partials`: each partial
        is rounded through q80 before it is added (engine.LocalExchange's quantize_partials)."""
        if x.shape[0] > MAX_BATCH:  # a batch at a time; each part copied out of the buffer the next one reuses
            if not isinstance(pos, int) or not isinstance(logits, str):
                raise ValueError(f"a step takes at most {MAX_BATCH} tokens")
            starts = range(0, x.shape[0], MAX_BATCH)
            before_last = "all" if logits == "all" else "none"
            return np.concatenate([self.whole(x[s:s + MAX_BATCH], pos + s, None,
                                              logits if s == starts[-1] else before_last, q80_partials).copy()
                                   for s in starts])
        T = x.shape[0]
        rows = logit_rows(logits, T)
        self.x[:T] = x
        self._place(pos, 0, T)
        key = (T, whole_pass_adds(q80_partials), logits)
        p = self.program(*key)
        direct = (rows and out is not None and out.dtype == np.float32 and out.flags.c_contiguous
                  and out.shape == (rows, self.logits.shape[1]))
        target = out if direct else self.logits_home.get(key)  # None: no lm_head in this program
        if target is not None:
            self._aim_logits(key, p, target)
        p.run("token", 0)
        x[:] = self.x[:T]
        return target if target is not None else self.logits[:0]

    def one_token(self, embedding_row: np.ndarray, pos: int, q80_partials: bool = False, slot: int = 0) -> np.ndarray:
        """whole() for one token (at pos in `slot`): its logits (1, vocab), a new array. A generated token's pass."""
        self.x[0] = embedding_row
        self.positions[0], self.slots[0] = pos, slot
        key = (1, whole_pass_adds(q80_partials), "all")
        p = self.program(*key)
        home = self.logits_home[key]
        self._aim_logits(key, p, home)
        p.run("token", 0)
        return home.copy()

    def _place(self, pos: "int | Places", start: int, T: int) -> None:
        """Tokens start..start+T of a batch at `pos` go where the next run puts them (its positions and slots)."""
        if isinstance(pos, Places):
            self.positions[:T], self.slots[:T] = pos.positions[start:start + T], pos.slots[start:start + T]
        else:
            self.positions[:T] = np.arange(pos + start, pos + start + T)
            self.slots[:T] = 0

    def _aim_logits(self, key: tuple[int, int, str], p: dispatch.Program, target: np.ndarray) -> None:
        """Program key's lm_head writes into target from its next run."""
        if self.logits_target[key] is not target:
            p.point(self.lm_head_ops[key], LM_HEAD_OUT, target)
            self.logits_target[key] = target  # held, so the table never names freed memory

    def program(self, T: int, adds: int, logits: str = "all") -> dispatch.Program:
        """The program for T tokens: the stretches (adds 0) or the whole pass adding each partial as `adds`
        (whole_pass_adds) says."""
        key = (T, adds, logits)
        if key not in self.programs:
            if isinstance(logits, int):  # a step's: forget the least recently built beyond STEP_PROGRAMS
                steps = [k for k in self.programs if isinstance(k[2], int)]
                for old in steps[:max(0, len(steps) + 1 - STEP_PROGRAMS)]:
                    for table in (self.programs, self.lm_head_ops, self.logits_home, self.logits_target):
                        table.pop(old, None)
            self.programs[key] = self._build(T, adds, logits)
        return self.programs[key]

    def _build(self, T: int, adds: int, logits: str) -> dispatch.Program:
        p = dispatch.Program()
        self._views: dict[tuple, tuple] = {}  # _view's, for this build
        whole = adds != 0
        for layer in range(self.n.h.n_layers):
            self._attention_ops(p, layer, T, add=adds)
            if not whole:
                p.mark(f"attention {layer}")
            self._ffn_ops(p, layer, T, add=adds)
            if not whole:
                p.mark(f"ffn {layer}")
        if rows := logit_rows(logits, T):  # the last `rows` tokens' final norm and lm_head, into logits[:rows]
            first = T - rows
            self._norm(p, T, self.n.w.norm, self.n.w.lm_head.quantized, first)
            home = self.logits[:rows]
            self.lm_head_ops[(T, adds, logits)] = self._matmul(p, self.n.w.lm_head, self.xq, self.y, T, home,
                                                               barrier=False, first=first)
            self.logits_home[(T, adds, logits)] = self.logits_target[(T, adds, logits)] = home
        p.mark("token" if whole else "logits")
        p.seal()
        del self._views
        return p

    def _view(self, a, how: tuple, make: Callable) -> object:
        """make(a), one object per (a, how) throughout a build: Program.add reads each array's address once
        (a is held beside it, so no other object takes its id meanwhile)."""
        key = (id(a), *how)
        if key not in self._views:
            self._views[key] = (a, make(a))
        return self._views[key][1]

    def _rows(self, a: np.ndarray, start: int, stop: int) -> np.ndarray:
        return self._view(a, ("rows", start, stop), lambda a: a[start:stop])

    def _tokens(self, buffers: tuple[np.ndarray, ...], T: int, first: int = 0) -> tuple[np.ndarray, ...]:
        return self._view(buffers, ("tokens", T, first), lambda buffers: tokens(buffers, T, first))

    def _heads(self, a: np.ndarray, T: int) -> np.ndarray:
        """a[:T] as (T, heads, head_dim)."""
        return self._view(a, ("heads", T), lambda a: a[:T].reshape(T, -1, self.n.h.head_dim))

    def _attention_ops(self, p: dispatch.Program, layer: int, T: int, add: int) -> None:
        n, lw, hd = self.n, self.n.w.layers[layer], self.n.h.head_dim
        self._norm(p, T, lw.attn_norm, self.quantized)
        for m, out, last in ((lw.q, self.q, False), (lw.k, self.k, False), (lw.v, self.v, True)):
            self._matmul(p, m, self.xq, self.y, T, out, barrier=last)
        q, k, v = (self._heads(a, T) for a in (self.q, self.k, self.v))
        places = self._rows(self.positions, 0, T), self._rows(self.slots, 0, T)
        k_cache, v_cache = (self._view(c, ("cache", layer), lambda c: c[layer].reshape(-1, *c.shape[3:]))
                            for c in (n.k_cache, n.v_cache))  # (slots * kv heads, positions, hd)
        p.add(dispatch.OP_ROPE_KV, (q, k, v, k_cache, v_cache, n.rope.cos, n.rope.sin, *places),
              (int(n.rope.falcon), 0))
        fuse = self.quantized and hd % 64 == 0  # each head's output is whole q80 block pairs
        z = self._rows(self.z, 0, T)
        p.add(dispatch.OP_ATTENTION, (q, k_cache, v_cache, z, *self._tokens(self.zq, T), *places),
              (int(fuse), n.kv_heads))
        if self.quantized and not fuse:
            p.add(dispatch.OP_QUANTIZE, (z, *self._tokens(self.zq, T)))
        self._matmul(p, lw.wo, self.zq, self.z, T, self.partial, add=add)

    def _ffn_ops(self, p: dispatch.Program, layer: int, T: int, add: int) -> None:
        lw = self.n.w.layers[layer]
        self._norm(p, T, lw.ffn_norm, self.quantized)
        p.add(dispatch.OP_FFN_UP, (weight_bytes(lw.w1), weight_bytes(lw.w3), *self._tokens(self.xq, T),
                                  dispatch.F16_TO_F32, self._rows(self.y, 0, T), self._rows(self.h1, 0, T),
                                  self._rows(self.h3, 0, T), *self._tokens(self.hq, T)),
              (WEIGHT_KINDS[lw.w1.float_type], 0))
        self._matmul(p, lw.w2, self.hq, self.h1, T, self.partial, add=add)

    def _norm(self, p: dispatch.Program, T: int, weight: np.ndarray, quantize: bool, first: int = 0) -> None:
        """Tokens first..T of x: rmsnorm into y, and its q80 when `quantize`."""
        p.add(dispatch.OP_NORM_Q80, (self._rows(self.x, first, T), np.ascontiguousarray(weight, np.float32), self.eps,
                                    self._rows(self.y, first, T), *self._tokens(self.xq, T, first), self.squares),
              (int(quantize), 0))

    def _matmul(self, p: dispatch.Program, m: Matrix, xq: tuple, xf: np.ndarray, T: int, out: np.ndarray,
                add: int = 0, barrier: bool = True, first: int = 0) -> int:
        """Tokens first..T of the input (xq, or xf for float32 weights) times m into out[:T - first], and
        added into x when `add` (dispatch.ADD, ADD_Q80)."""
        return p.add(dispatch.OP_MATMUL, (weight_bytes(m), *self._tokens(xq, T, first), dispatch.F16_TO_F32,
                                          self._rows(xf, first, T), self._rows(out, 0, T - first),
                                          self._rows(self.x, first, T) if add else None),
                     (WEIGHT_KINDS[m.float_type], int(add)), barrier)


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in anonymous memory that becomes resident 4 KB at a time as it is written. numpy asks for
    2 MB huge pages for arrays of 4 MB and more: a KV cache's first token in each layer would then
    zero 2 MB (the kernel compacting memory to find them, sometimes for 0.2 s), and hold it in RSS
    however few positions are used."""
    count = math.prod(shape)
    memory = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)


def q80_buffers(T: int, n: int) -> tuple[np.ndarray, ...]:
    """xq, xd, xc (tensors.QuantizedInput) for T tokens of n values."""
    return np.zeros((T, n), np.int8), np.zeros((T, n // 32), np.float32), np.zeros((T, n // 32), np.int32)


def tokens(buffers: tuple[np.ndarray, ...], T: int, first: int = 0) -> tuple[np.ndarray, ...]:
    """Tokens first..T of q80_buffers."""
    return tuple(a[first:T] for a in buffers)


def weight_bytes(m: Matrix) -> np.ndarray:
    """The rows as the programs take them: (rows, row bytes) uint8 whatever the float type, q40 interleaved."""
    data = m.for_kernels().data
    return data.view(np.uint8) if data.dtype != np.uint8 else data


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
