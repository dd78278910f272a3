"""Reference runs of the ORIGINAL checkpoint in float32 numpy: exact, or with a file's arithmetic.

Deliberately independent of dllama.runtime: it reads the Hugging Face layout (q/k rows NOT
permuted, `rotate_half` rope on pairs (i, i + head_dim/2)), so a converter bug that the runtime
shares (a wrong permute, a wrong rope_theta) still shows up. Each block is one short function,
readable next to FORMAT.md §2 and transformers' modeling_llama/qwen3(_moe).

`Arithmetic` says what a q40/q80 file computes (weights rounded through its codec, written here
from FORMAT.md §1.2, matmul inputs
quantized to q80, optionally the sync buffers rounded through q80); `ReferenceModel` runs the
original with it and records the hidden state x after every attention and FFN block (a `Trace`),
so the validator can feed each block of our runtime exactly the reference's input.

REF.npz (docs/VALIDATE.md) extends tests/fixtures/conformance/*/reference_logits.npz, which
stay valid `--reference` files: `ids{j}` (int, bos first) and `logits{j}` (float32, exact).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from dllama.checkpoint import rope_settings
from dllama.errors import DllamaError
from dllama.formats import FloatType, atomic_output

# Short, varied prompts: prose, code, numbers, non-English. Few and short on purpose: a small
# board validates a 1B model in under a minute (benchmarks/validate.py).
DEFAULT_PROMPTS = (
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 5, 8, 13, 21,",
    "Der schnelle braune Fuchs springt über den faulen Hund. 東京は",
)
DEFAULT_MAX_TOKENS = 24

# logits.correctness traces the first prompts only: each block is compared on every value of
# every position, which the first three (~50 positions) give plenty of; the arithmetic run costs
# what the exact one does, and on a 1B model both dominate `--hf` (docs/VALIDATE.md).
DEFAULT_TRACED = 3


class ReferenceModelError(DllamaError, ValueError):
    """The reference logits cannot be computed or read."""


# --------------------------------------------------------------------------------------------
# The blocks (FORMAT.md §2, in the Hugging Face layout)

def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def rope_frequencies(config: dict, head_dim: int) -> np.ndarray:
    """inv_freq of transformers' rope init, with llama3 scaling when the config asks for it."""
    theta, scaling = rope_settings(config)
    theta = 10000.0 if theta is None else float(theta)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    orig = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return np.where(medium, blended, scaled)


def rope(x: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x: (T, heads, head_dim). HF rotate_half: pairs (i, i + head_dim/2) share frequency i."""
    angles = np.arange(x.shape[0], dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(np.concatenate([angles, angles], axis=-1)).astype(np.float32)[:, None, :]
    sin = np.sin(np.concatenate([angles, angles], axis=-1)).astype(np.float32)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal grouped-query attention. q: (T, H, hd); k, v: (T, KVH, hd) -> (T, H * hd)."""
    T, n_heads, hd = q.shape
    group = n_heads // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.float32(math.sqrt(hd))
    scores = scores + np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    weights = softmax(scores)
    return np.einsum("hts,shd->thd", weights, v).reshape(T, n_heads * hd)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) gelu, transformers' "gelu"."""
    return (0.5 * x * (1 + _erf(x / math.sqrt(2)).astype(np.float32))).astype(np.float32)


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"silu": silu, "gelu": gelu}


# --------------------------------------------------------------------------------------------
# The model

@dataclass(frozen=True)
class ReferenceConfig:
    """What the forward pass needs from config.json, read the way transformers reads it."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    act: str
    n_experts: int
    n_active_experts: int
    norm_topk_prob: bool

    @classmethod
    def from_config(cls, c: dict) -> "ReferenceConfig":
        n_heads = int(c["num_attention_heads"])
        return cls(
            model_type=c.get("model_type", "llama"),
            n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // n_heads),
            eps=float(c.get("rms_norm_eps", 1e-6)),
            act=c.get("hidden_act", "silu"),
            n_experts=int(c.get("num_experts") or c.get("num_local_experts") or 0),
            n_active_experts=int(c.get("num_experts_per_tok") or 0),
            norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        )


@dataclass(frozen=True)
class Arithmetic:
    """The arithmetic a file specifies (FORMAT.md §2), applied to the ORIGINAL weights.

    exact: float32 everywhere, the original model. For a q40/q80 file: every matrix the `.m`
    stores in its weight type (§1.3: all but the embedding and the moe gate) rounded through
    that codec; the input of every such matmul quantized to q80, as the runtime quantizes its
    activations; with `q80_partials`, the attention and FFN outputs (the sync buffers a node
    exchanges, §3) rounded through q80 before they are added to x."""

    weights: FloatType = FloatType.F32
    q80_activations: bool = False
    q80_partials: bool = False

    @classmethod
    def of_file(cls, weights: FloatType, q80_partials: bool = False) -> "Arithmetic":
        quantized = weights in (FloatType.Q40, FloatType.Q80)
        return cls(weights, quantized, quantized and q80_partials)

    @property
    def exact(self) -> bool:
        return self == Arithmetic()

    @property
    def name(self) -> str:
        """"exact", "q40", "q80", "q40_partials" ...: REF.npz key prefixes."""
        if self.exact:
            return "exact"
        return self.weights.name.lower() + ("_partials" if self.q80_partials else "")


EXACT = Arithmetic()


def blocks_of(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)


def f16_rounded(d: np.ndarray) -> np.ndarray:
    """A block scale as the file stores it (f16), back in float32."""
    return d.astype(np.float16).astype(np.float32)


def reciprocal(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def q80_round(x: np.ndarray) -> np.ndarray:
    """x quantized to q80 and back (FORMAT.md §1.2) along its last axis: d = amax / 127,
    q = round-half-even(x / d), value = q * f16(d). Written here from FORMAT.md, not taken from
    dllama.formats, so a codec bug the converter and runtime share still shows."""
    b = blocks_of(x)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    q = np.rint(b * reciprocal(d)[:, None])
    return (q * f16_rounded(d)[:, None]).reshape(x.shape)


def q40_round(x: np.ndarray) -> np.ndarray:
    """x quantized to q40 and back (FORMAT.md §1.2): m = the value of largest magnitude (max on a
    tie), d = m / -8, q = trunc(clip(x / d + 8.5, 0, 15)), value = (q - 8) * f16(d)."""
    b = blocks_of(x)
    mx, mn = b.max(axis=1), b.min(axis=1)
    d = (np.where(-mn > mx, mn, mx) / np.float32(-8)).astype(np.float32)
    q = b * reciprocal(d)[:, None]
    q += np.float32(8.5)
    np.clip(q, 0, 15, out=q)
    np.trunc(q, out=q)
    q -= np.float32(8)
    q *= f16_rounded(d)[:, None]
    return q.reshape(x.shape)


ROUNDING = {FloatType.Q40: q40_round, FloatType.Q80: q80_round}


class ReferenceModel:
    """Float32 forward of a Hugging Face checkpoint with a file's `Arithmetic` (default: exact);
    weights are read one layer at a time."""

    def __init__(self, checkpoint, arithmetic: Arithmetic = EXACT):
        self.ckpt = checkpoint
        self.arith = arithmetic
        self.cfg = ReferenceConfig.from_config(checkpoint.config)
        if self.cfg.act not in ACTIVATIONS:
            raise ReferenceModelError(f"hidden_act {self.cfg.act!r} has no reference implementation (silu, gelu)")
        self.inv_freq = rope_frequencies(checkpoint.config, self.cfg.head_dim)

    def w(self, name: str) -> np.ndarray:
        """A float32 tensor (embedding, norms, moe gate)."""
        return self.ckpt.get(name)

    def matrix(self, name: str) -> np.ndarray:
        """A weight matrix, rounded like the file's weight type."""
        w = self.ckpt.get(name)
        if self.arith.weights == FloatType.F32:
            return w
        return ROUNDING[self.arith.weights](w)

    def matmul_input(self, x: np.ndarray, feeds: str) -> np.ndarray:
        """What a weight matrix multiplies: x, or x quantized to q80. `feeds` names the (first) matrix
        it multiplies, for a subclass that observes activations (dllama.converter.calibration)."""
        return q80_round(x) if self.arith.q80_activations else x

    def sync(self, partial: np.ndarray) -> np.ndarray:
        """An attention or FFN output on its way into x (the sync buffer)."""
        return q80_round(partial) if self.arith.q80_partials else partial

    def embed(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """The stacked prompts' rows of the embedding (float32 in every file)."""
        return self.w("model.embed_tokens.weight")[np.concatenate([np.asarray(ids, dtype=np.int64) for ids in prompts])]

    def head(self, x: np.ndarray) -> np.ndarray:
        """Final norm and lm_head (the embedding when tied): x (N, dim) -> logits (N, vocab)."""
        name = "lm_head.weight" if "lm_head.weight" in self.ckpt else "model.embed_tokens.weight"
        return self.matmul_input(rmsnorm(x, self.w("model.norm.weight"), self.cfg.eps), name) @ self.matrix(name).T

    def logits(self, prompts: Sequence[Sequence[int]], progress: Callable[[int, int],
                                                                          None] | None = None) -> list[np.ndarray]:
        """Logits (T, vocab) for every prompt."""
        trace = run_together(self.ckpt, {"run": Run(self.arith, prompts, keep_states=False)}, progress)["run"]
        return np.split(trace.logits, np.cumsum(trace.lengths)[:-1])

    def attention_block(self, layer: int, x: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
        """Wo z for x (the stacked prompts' rows; `lengths` says where each prompt's rows end)."""
        p = f"model.layers.{layer}."
        c = self.cfg
        y = self.matmul_input(rmsnorm(x, self.w(p + "input_layernorm.weight"), c.eps), p + "self_attn.q_proj.weight")
        q = (y @ self.matrix(p + "self_attn.q_proj.weight").T).reshape(-1, c.n_heads, c.head_dim)
        k = (y @ self.matrix(p + "self_attn.k_proj.weight").T).reshape(-1, c.n_kv_heads, c.head_dim)
        v = (y @ self.matrix(p + "self_attn.v_proj.weight").T).reshape(-1, c.n_kv_heads, c.head_dim)
        if p + "self_attn.q_norm.weight" in self.ckpt:  # qwen3: per-head rmsnorm before rope
            q = rmsnorm(q, self.w(p + "self_attn.q_norm.weight"), c.eps)
            k = rmsnorm(k, self.w(p + "self_attn.k_norm.weight"), c.eps)
        z = np.concatenate([attention(rope(qs, self.inv_freq), rope(ks, self.inv_freq),
                                      vs)  # positions from 0 per prompt
                            for qs, ks, vs in zip(*(np.split(t, np.cumsum(lengths)[:-1]) for t in (q, k, v)))])
        return self.matmul_input(z, p + "self_attn.o_proj.weight") @ self.matrix(p + "self_attn.o_proj.weight").T

    def ffn_block(self, layer: int, x: np.ndarray) -> np.ndarray:
        p = f"model.layers.{layer}."
        y = rmsnorm(x, self.w(p + "post_attention_layernorm.weight"), self.cfg.eps)
        return self.moe(p, y) if self.cfg.n_experts else self.dense(p, y)

    def ffn(self, y: np.ndarray, prefix: str) -> np.ndarray:
        """W2 (act(W1 y) * (W3 y)), each matmul's input as the arithmetic says."""
        y = self.matmul_input(y, prefix + "gate_proj.weight")
        gate = y @ self.matrix(prefix + "gate_proj.weight").T  # one matrix at a time: the converter's calibration
        hidden = ACTIVATIONS[self.cfg.act](gate) * (y @ self.matrix(prefix + "up_proj.weight").T)
        return self.matmul_input(hidden, prefix + "down_proj.weight") @ self.matrix(prefix + "down_proj.weight").T

    def dense(self, p: str, y: np.ndarray) -> np.ndarray:
        return self.ffn(y, p + "mlp.")

    def moe(self, p: str, y: np.ndarray) -> np.ndarray:
        """transformers' Qwen3MoeSparseMoeBlock: softmax router (float32 in every file), top-k,
        optional renormalisation."""
        c = self.cfg
        probs = softmax(y @ self.w(p + "mlp.gate.weight").T)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :c.n_active_experts]
        top_p = np.take_along_axis(probs, top, axis=-1)
        if c.norm_topk_prob:
            top_p = top_p / top_p.sum(axis=-1, keepdims=True)
        out = np.zeros_like(y)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            out[rows] += top_p[rows, slot][:, None] * self.ffn(y[rows], f"{p}mlp.experts.{e}.")
        return out


# --------------------------------------------------------------------------------------------
# Traces, and several runs in lockstep

@dataclass
class Trace:
    """One run over stacked prompts (`lengths` rows each). states[0] is the embedding rows,
    states[2l + 1] x after layer l's attention block, states[2l + 2] x after its FFN block
    (None when only the logits were kept); logits come from the last state."""

    lengths: list[int]
    states: np.ndarray | None  # (2 * n_layers + 1, rows, dim) float32
    logits: np.ndarray         # (rows, vocab) float32


class TraceBuilder:
    """A run advanced one layer at a time (so several runs can share each layer's weights)."""

    def __init__(self, model: ReferenceModel, prompts: Sequence[Sequence[int]], keep_states: bool = True):
        self.model = model
        self.lengths = [len(p) for p in prompts]
        self.keep_states = keep_states
        self.states = [model.embed(prompts)]

    def layer(self, layer: int) -> None:
        m, x = self.model, self.states[-1]
        after_attention = x + m.sync(m.attention_block(layer, x, self.lengths))
        after_ffn = after_attention + m.sync(m.ffn_block(layer, after_attention))
        if self.keep_states:
            self.states += [after_attention, after_ffn]
        else:
            self.states = [after_ffn]

    def finish(self) -> Trace:
        logits = self.model.head(self.states[-1]).astype(np.float32)
        states = np.stack(self.states).astype(np.float32) if self.keep_states else None
        return Trace(self.lengths, states, logits)


class LayerCache:
    """A checkpoint whose tensors are read once while several runs use them (forget() between layers)."""

    def __init__(self, checkpoint):
        self.ckpt = checkpoint
        self.config = checkpoint.config
        self.cache: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt

    def get(self, name: str) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = self.ckpt.get(name)
        return self.cache[name]

    def forget(self) -> None:
        self.cache.clear()


@dataclass
class Run:
    arithmetic: Arithmetic
    prompts: Sequence[Sequence[int]]
    keep_states: bool = True


def run_together(checkpoint, runs: dict[str, Run], progress: Callable[[int, int], None] | None = None) -> dict[str,
                                                                                                               Trace]:
    """Several runs of the original, layer by layer together: each tensor is read (a GGUF's
    dequantized) once for all of them."""
    weights = LayerCache(checkpoint)
    builders = {name: TraceBuilder(ReferenceModel(weights, run.arithmetic), run.prompts, run.keep_states)
                for name, run in runs.items()}
    n_layers = ReferenceConfig.from_config(checkpoint.config).n_layers
    weights.forget()
    for layer in range(n_layers):
        for builder in builders.values():
            builder.layer(layer)
        weights.forget()
        if progress:
            progress(layer + 1, n_layers + 1)
    out = {name: builder.finish() for name, builder in builders.items()}
    if progress:
        progress(n_layers + 1, n_layers + 1)
    return out


# --------------------------------------------------------------------------------------------
# REF.npz

ARITHMETIC_TYPES = (FloatType.Q40, FloatType.Q80)  # file types whose arithmetic differs from the exact run
REF_VERSION = 2


@dataclass
class ReferenceLogits:
    """What the validator needs from the original model, so a board can validate without it.

    ids/logits: every prompt (bos first) and its exact float32 logits. traces["q40"] etc.: the
    run with that file type's arithmetic (Arithmetic.of_file) over the first prompts, states
    included. config, bos_id, eos_ids: the original's, for the structure checks."""

    ids: list[np.ndarray]
    logits: list[np.ndarray]
    prompts: list[str] | None = None
    source: str | None = None
    traces: dict[str, Trace] = field(default_factory=dict)
    config: dict | None = None
    bos_id: int | None = None
    eos_ids: list[int] | None = None

    def save(self, path: str | os.PathLike) -> None:
        arrays: dict[str, np.ndarray] = {"ref_version": np.array(REF_VERSION)}
        for j, (ids, logits) in enumerate(zip(self.ids, self.logits)):
            arrays[f"ids{j}"] = np.asarray(ids, dtype=np.int64)
            arrays[f"logits{j}"] = np.asarray(logits, dtype=np.float32)
        for name, trace in self.traces.items():
            arrays[f"{name}_lengths"] = np.asarray(trace.lengths, dtype=np.int64)
            arrays[f"{name}_states"] = trace.states
            arrays[f"{name}_final_logits"] = trace.logits
        optional = {"prompts": self.prompts and np.array(self.prompts, dtype=np.str_),
                    "source": self.source and np.array(self.source, dtype=np.str_),
                    "config": self.config and np.array(json.dumps(self.config), dtype=np.str_),
                    "bos_id": None if self.bos_id is None else np.array(self.bos_id),
                    "eos_ids": None if self.eos_ids is None else np.asarray(self.eos_ids, dtype=np.int64)}
        arrays.update({k: v for k, v in optional.items() if v is not None})
        with atomic_output(path) as f:
            np.savez(f, **arrays)  # float32 noise does not compress; np.load maps nothing either way

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceLogits":
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ReferenceModelError(f"reference file {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise ReferenceModelError(f"{path} is not a readable .npz of reference logits ({e})") from None
        with data:
            files = set(data.files)
            n = sum(1 for k in files if k.startswith("logits"))
            if n == 0 or any(f"ids{j}" not in files or f"logits{j}" not in files for j in range(n)):
                raise ReferenceModelError(f"{path} lacks ids0/logits0...: write it with `dllama-validate reference "
                                          f"--hf SOURCE --out {path.name}`")
            ref = cls(ids=[data[f"ids{j}"].astype(np.int64) for j in range(n)],
                      logits=[data[f"logits{j}"].astype(np.float32) for j in range(n)],
                      prompts=[str(s) for s in data["prompts"]] if "prompts" in files else None,
                      source=str(data["source"]) if "source" in files else None,
                      config=json.loads(str(data["config"])) if "config" in files else None,
                      bos_id=int(data["bos_id"]) if "bos_id" in files else None,
                      eos_ids=[int(i) for i in data["eos_ids"]] if "eos_ids" in files else None)
            for name in sorted(k[:-len("_states")] for k in files if k.endswith("_states")):
                ref.traces[name] = Trace([int(i) for i in data[f"{name}_lengths"]],
                                         data[f"{name}_states"].astype(np.float32),
                                         data[f"{name}_final_logits"].astype(np.float32))
        ref._check_shapes(path)
        return ref

    def _check_shapes(self, path: Path) -> None:
        for j, (i, logits) in enumerate(zip(self.ids, self.logits)):
            if logits.ndim != 2 or logits.shape != (len(i), self.logits[0].shape[1]):
                raise ReferenceModelError(f"{path}: logits{j} has shape {logits.shape} for {len(i)} ids; the file is "
                                          "corrupt")
        for name, t in self.traces.items():
            rows = sum(t.lengths)
            if t.states.ndim != 3 or t.states.shape[1] != rows or t.logits.shape != (rows, self.vocab_size):
                raise ReferenceModelError(f"{path}: the {name} trace has inconsistent shapes; the file is corrupt")

    @property
    def vocab_size(self) -> int:
        return self.logits[0].shape[1]


def compute_reference(checkpoint, prompt_ids: Iterable[Sequence[int]], prompts: list[str] | None = None,
                      arithmetics: Sequence[FloatType] = (), traced: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> ReferenceLogits:
    """Exact logits for every prompt, plus for each file type in `arithmetics` (q40, q80) a traced
    run with that file's arithmetic over the first `traced` prompts (default all)."""
    ids = [np.asarray(p, dtype=np.int64) for p in prompt_ids]
    traced_ids = ids[:traced]
    runs = {"exact": Run(EXACT, ids, keep_states=False)}
    runs.update({ft.name.lower(): Run(Arithmetic.of_file(ft), traced_ids) for ft in arithmetics})
    out = run_together(checkpoint, runs, progress)
    exact = out.pop("exact")
    return ReferenceLogits(ids, np.split(exact.logits, np.cumsum(exact.lengths)[:-1]), prompts,
                           source=str(getattr(checkpoint, "folder", "")), traces=out, config=dict(checkpoint.config))
