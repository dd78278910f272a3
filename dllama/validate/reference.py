"""Reference logits: the ORIGINAL Hugging Face checkpoint run in float32 numpy.

Deliberately independent of dllama.runtime: it reads the Hugging Face layout (q/k rows NOT
permuted, `rotate_half` rope on pairs (i, i + head_dim/2)), so a converter bug that the runtime
shares (a wrong permute, a wrong rope_theta) still shows up as a logit difference. Each block is
one short function, readable next to FORMAT.md §2 and transformers' modeling_llama/qwen3(_moe).

The REF.npz layout matches ../shared/fixtures/conformance/*/reference_logits.npz, so those
files are valid `--reference` inputs: `ids{j}` (int, bos first), `logits{j}` (float32, one row
per position), and optionally `prompts` (the texts) and `source` (where the logits came from).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from dllama.checkpoint import Checkpoint, rope_settings
from dllama.formats import FloatType, atomic_output, decode_tensor, encode_tensor

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


class ReferenceError(ValueError):
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


def ffn(y: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray, act) -> np.ndarray:
    return (act(y @ w_gate.T) * (y @ w_up.T)) @ w_down.T


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


class ReferenceModel:
    """Float32 forward of a Hugging Face checkpoint; weights are read one layer at a time.

    `rounding` (q40/q80) first rounds every matrix the `.m` stores in its weight type (FORMAT.md
    §1.3: all but the embedding and the moe gate) through that codec, in the Hugging Face layout:
    the original model as a quantized file should compute it, without reading that file."""

    def __init__(self, checkpoint: Checkpoint, rounding: FloatType | None = None):
        self.ckpt = checkpoint
        self.rounding = rounding
        self.cfg = ReferenceConfig.from_config(checkpoint.config)
        if self.cfg.act not in ACTIVATIONS:
            raise ReferenceError(f"hidden_act {self.cfg.act!r} has no reference implementation (silu, gelu)")
        self.inv_freq = rope_frequencies(checkpoint.config, self.cfg.head_dim)

    def w(self, name: str) -> np.ndarray:
        """A float32 tensor (embedding, norms, moe gate)."""
        return self.ckpt.get(name)

    def matrix(self, name: str) -> np.ndarray:
        """A weight matrix, rounded like the file's weight type when simulating one."""
        w = self.ckpt.get(name)
        if self.rounding is None or self.rounding == FloatType.F32:
            return w
        return decode_tensor(encode_tensor(w, self.rounding), self.rounding, w.shape)

    def logits(self, prompts: Sequence[Sequence[int]], progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        """Logits (T, vocab) for every prompt. The prompts' rows are stacked for every matmul
        (each weight is read once per pass) and kept apart only inside attention."""
        lengths = [len(ids) for ids in prompts]
        embedding = self.w("model.embed_tokens.weight")
        x = embedding[np.concatenate([np.asarray(ids, dtype=np.int64) for ids in prompts])]
        del embedding
        for layer in range(self.cfg.n_layers):
            x = self.layer(layer, x, lengths)
            if progress:
                progress(layer + 1, self.cfg.n_layers + 1)
        head_name = "lm_head.weight" if "lm_head.weight" in self.ckpt else "model.embed_tokens.weight"
        logits = rmsnorm(x, self.w("model.norm.weight"), self.cfg.eps) @ self.matrix(head_name).T
        if progress:
            progress(self.cfg.n_layers + 1, self.cfg.n_layers + 1)
        return np.split(logits, np.cumsum(lengths)[:-1])

    def layer(self, l: int, x: np.ndarray, lengths: list[int]) -> np.ndarray:
        """x: the stacked prompts' rows; `lengths` says where each prompt's rows end."""
        p = f"model.layers.{l}."
        c = self.cfg
        y = rmsnorm(x, self.w(p + "input_layernorm.weight"), c.eps)
        q = (y @ self.matrix(p + "self_attn.q_proj.weight").T).reshape(-1, c.n_heads, c.head_dim)
        k = (y @ self.matrix(p + "self_attn.k_proj.weight").T).reshape(-1, c.n_kv_heads, c.head_dim)
        v = (y @ self.matrix(p + "self_attn.v_proj.weight").T).reshape(-1, c.n_kv_heads, c.head_dim)
        if p + "self_attn.q_norm.weight" in self.ckpt:  # qwen3: per-head rmsnorm before rope
            q = rmsnorm(q, self.w(p + "self_attn.q_norm.weight"), c.eps)
            k = rmsnorm(k, self.w(p + "self_attn.k_norm.weight"), c.eps)
        z = np.concatenate([attention(rope(qs, self.inv_freq), rope(ks, self.inv_freq), vs)  # positions from 0 per prompt
                            for qs, ks, vs in zip(*(np.split(t, np.cumsum(lengths)[:-1]) for t in (q, k, v)))])
        x = x + z @ self.matrix(p + "self_attn.o_proj.weight").T
        y = rmsnorm(x, self.w(p + "post_attention_layernorm.weight"), c.eps)
        return x + (self.moe(p, y) if c.n_experts else self.dense(p, y))

    def dense(self, p: str, y: np.ndarray) -> np.ndarray:
        w1, w3, w2 = (self.matrix(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
        return ffn(y, w1, w3, w2, ACTIVATIONS[self.cfg.act])

    def moe(self, p: str, y: np.ndarray) -> np.ndarray:
        """transformers' Qwen3MoeSparseMoeBlock: softmax router, top-k, optional renormalisation."""
        c = self.cfg
        probs = softmax(y @ self.w(p + "mlp.gate.weight").T)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :c.n_active_experts]
        top_p = np.take_along_axis(probs, top, axis=-1)
        if c.norm_topk_prob:
            top_p = top_p / top_p.sum(axis=-1, keepdims=True)
        out = np.zeros_like(y)
        act = ACTIVATIONS[c.act]
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            x = f"{p}mlp.experts.{e}."
            w1, w3, w2 = (self.matrix(x + f"{n}_proj.weight") for n in ("gate", "up", "down"))
            out[rows] += top_p[rows, slot][:, None] * ffn(y[rows], w1, w3, w2, act)
        return out


# --------------------------------------------------------------------------------------------
# REF.npz

ROUNDABLE = (FloatType.Q40, FloatType.Q80)  # weight types a rounded reference exists for


@dataclass
class ReferenceLogits:
    """Reference logits per prompt; `rounded["q40"]` etc.: the same prompts with the weights
    rounded like a q40 / q80 file (ReferenceModel's `rounding`)."""

    ids: list[np.ndarray]
    logits: list[np.ndarray]
    prompts: list[str] | None = None
    source: str | None = None
    rounded: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        arrays: dict[str, np.ndarray] = {}
        for j, (ids, logits) in enumerate(zip(self.ids, self.logits)):
            arrays[f"ids{j}"] = np.asarray(ids, dtype=np.int64)
            arrays[f"logits{j}"] = np.asarray(logits, dtype=np.float32)
        for name, per_prompt in self.rounded.items():
            for j, logits in enumerate(per_prompt):
                arrays[f"{name}_logits{j}"] = np.asarray(logits, dtype=np.float32)
        if self.prompts is not None:
            arrays["prompts"] = np.array(self.prompts, dtype=np.str_)
        if self.source is not None:
            arrays["source"] = np.array(self.source, dtype=np.str_)
        with atomic_output(path) as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceLogits":
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ReferenceError(f"reference file {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise ReferenceError(f"{path} is not a readable .npz of reference logits ({e})") from None
        with data:
            n = sum(1 for k in data.files if k.startswith("logits"))
            if n == 0 or any(f"ids{j}" not in data.files or f"logits{j}" not in data.files for j in range(n)):
                raise ReferenceError(f"{path} lacks ids0/logits0...: write it with `dllama-validate reference --hf SOURCE --out {path.name}`")
            ids = [data[f"ids{j}"].astype(np.int64) for j in range(n)]
            logits = [data[f"logits{j}"].astype(np.float32) for j in range(n)]
            rounded = {ft.name.lower(): [data[f"{ft.name.lower()}_logits{j}"].astype(np.float32) for j in range(n)]
                       for ft in ROUNDABLE if all(f"{ft.name.lower()}_logits{j}" in data.files for j in range(n))}
            prompts = [str(s) for s in data["prompts"]] if "prompts" in data.files else None
            source = str(data["source"]) if "source" in data.files else None
        for j, i in enumerate(ids):
            for name, per_prompt in [("", logits)] + [(f"{k}_", v) for k, v in rounded.items()]:
                if per_prompt[j].ndim != 2 or per_prompt[j].shape != (len(i), logits[0].shape[1]):
                    raise ReferenceError(f"{path}: {name}logits{j} has shape {per_prompt[j].shape} for {len(i)} ids; the file is corrupt")
        return cls(ids, logits, prompts, source, rounded)

    @property
    def vocab_size(self) -> int:
        return self.logits[0].shape[1]


def compute_reference(checkpoint: Checkpoint, prompt_ids: Iterable[Sequence[int]], prompts: list[str] | None = None,
                      roundings: Sequence[FloatType] = (), progress: Callable[[int, int], None] | None = None) -> ReferenceLogits:
    """Exact float32 logits, plus the rounded-weights logits for each of `roundings` (q40, q80)."""
    ids = [np.asarray(p, dtype=np.int64) for p in prompt_ids]
    passes = [None, *roundings]
    done = [0]

    def step(i: int, total: int) -> None:
        if progress:
            progress(done[0] * total + i, total * len(passes))

    out = {}
    for k, rounding in enumerate(passes):
        done[0] = k
        out[rounding] = ReferenceModel(checkpoint, rounding).logits(ids, progress=step)
    return ReferenceLogits(ids, out.pop(None), prompts, source=str(checkpoint.folder),
                           rounded={ft.name.lower(): v for ft, v in out.items()})
