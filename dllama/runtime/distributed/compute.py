"""One node's share of the forward pass (FORMAT.md §2 cut by §3): its heads, its FFN rows, its
logits rows. Each step returns the node's partial `dim` vectors; summing the partials of all
nodes in node order is the caller's job (the exchange seams).

Matrix products and attention run in the single-node runtime's numba kernels
(dllama/runtime/tensors.py Matrix, kernels.attention) on the node's slice bytes; q80 activations against q40/q80 weights,
f32 against f32, as FORMAT.md §2.
"""
from __future__ import annotations

import math

import numpy as np


from dllama.formats import FloatType, ModelHeader, RopeType, dequantize_q80, quantize_q80, tensor_plan
from dllama.runtime import kernels
from dllama.runtime.tensors import Matrix
from dllama.runtime.distributed.plan import slice_shape


def typed_slice(raw: np.ndarray, shape: tuple[int, ...], float_type: FloatType) -> np.ndarray | Matrix:
    """Slice bytes -> the runtime's Matrix for weights, a float32 array for norms."""
    if len(shape) == 1:
        return raw.view("<f4").reshape(shape)
    data = raw.view("<f4").reshape(shape) if float_type == FloatType.F32 else raw.reshape(shape[0], -1)
    return Matrix(data, float_type, shape)


def matmul(w: Matrix, x: np.ndarray) -> np.ndarray:
    """(T, in) activations times a (out, in) weight -> (T, out); quantized weights meet q80 activations."""
    return w @ x


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps))).astype(np.float32) * weight


def rope_frequencies(h: ModelHeader) -> np.ndarray:
    hd = h.head_dim
    freqs = h.theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    if h.rope_type == RopeType.LLAMA3_1 and h.rope_scaling_factor:
        factor, low, high = h.rope_scaling_factor, h.rope_scaling_low_freq_factor, h.rope_scaling_high_freq_factor
        orig = h.rope_scaling_orig_max_seq_len
        wavelen = 2 * math.pi / freqs
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = np.where(wavelen < orig / high, freqs, np.where(wavelen > orig / low, freqs / factor, blended))
    return freqs


def rope(v: np.ndarray, positions: np.ndarray, freqs: np.ndarray, rope_type: RopeType) -> np.ndarray:
    """Rotate (T, heads, head_dim) at `positions`: adjacent pairs (llama) or split halves (falcon)."""
    angle = positions[:, None].astype(np.float64) * freqs[None, :]
    cos = np.cos(angle).astype(np.float32)[:, None, :]
    sin = np.sin(angle).astype(np.float32)[:, None, :]
    half = v.shape[-1] // 2
    if rope_type == RopeType.FALCON:
        a, b = v[..., :half], v[..., half:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    a, b = v[..., 0::2], v[..., 1::2]
    out = np.empty_like(v)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


class SliceCompute:
    """Node `node` of `n_nodes`: holds its slices and the KV cache of its kv heads."""

    def __init__(self, header: ModelHeader, slices: dict[str, np.ndarray], node: int, n_nodes: int, max_seq_len: int):
        self.h = header
        self.node, self.n_nodes = node, n_nodes
        self.max_seq_len = max_seq_len
        self.w = {}
        for spec in tensor_plan(header):
            if spec.name in slices and spec.name != "embedding":
                self.w[spec.name] = typed_slice(slices[spec.name], slice_shape(spec, n_nodes), spec.float_type)
        self.heads = header.n_heads // n_nodes
        self.kv_heads = header.n_kv_heads // n_nodes
        kv = self.kv_heads * header.head_dim
        self.k_cache = np.zeros((header.n_layers, max_seq_len, kv), dtype=np.float32)
        self.v_cache = np.zeros((header.n_layers, max_seq_len, kv), dtype=np.float32)
        self.freqs = rope_frequencies(header)

    def reset(self) -> None:
        pass  # positions index the cache: a new sequence at pos 0 overwrites it

    def attention(self, layer: int, x: np.ndarray, pos: int) -> np.ndarray:
        h, w, p = self.h, self.w, f"layers.{layer}."
        T, hd = x.shape[0], h.head_dim
        y = rmsnorm(x, w[p + "attn_norm"], h.norm_epsilon)
        q = matmul(w[p + "q"], y).reshape(T, self.heads, hd)
        k = matmul(w[p + "k"], y).reshape(T, self.kv_heads, hd)
        v = matmul(w[p + "v"], y)
        if h.has_qk_norm:
            q = rmsnorm(q, w[p + "q_norm"], h.norm_epsilon)
            k = rmsnorm(k, w[p + "k_norm"], h.norm_epsilon)
        positions = np.arange(pos, pos + T)
        q = rope(q, positions, self.freqs, h.effective_rope_type)
        k = rope(k, positions, self.freqs, h.effective_rope_type)
        self.k_cache[layer, pos:pos + T] = k.reshape(T, -1)
        self.v_cache[layer, pos:pos + T] = v
        z = self._attend(layer, q, pos)
        return matmul(w[p + "wo"], z)

    def _attend(self, layer: int, q: np.ndarray, pos: int) -> np.ndarray:
        T, hd = q.shape[0], self.h.head_dim
        keys = self.k_cache[layer].reshape(self.max_seq_len, self.kv_heads, hd)
        values = self.v_cache[layer].reshape(self.max_seq_len, self.kv_heads, hd)
        out = np.empty((T, self.heads * hd), dtype=np.float32)
        kernels.attention(np.ascontiguousarray(q, dtype=np.float32), keys, values, pos, out)
        return out

    def ffn(self, layer: int, x: np.ndarray) -> np.ndarray:
        h, w, p = self.h, self.w, f"layers.{layer}."
        if h.is_moe:
            raise NotImplementedError("distributed qwen3_moe is not supported yet: run it on one node")
        y = rmsnorm(x, w[p + "ffn_norm"], h.norm_epsilon)
        a = matmul(w[p + "w1"], y)
        b = matmul(w[p + "w3"], y)
        hidden = (a / (np.float32(1) + np.exp(-a))) * b  # silu, whatever hidden_act says (§2)
        return matmul(w[p + "w2"], hidden.astype(np.float32))

    def logits(self, x: np.ndarray) -> np.ndarray:
        y = rmsnorm(x, self.w["norm"], self.h.norm_epsilon)
        return matmul(self.w["lm_head"], y)


def q80_round_trip(p: np.ndarray) -> np.ndarray:
    """A partial as it is added to x with q80 buffers (FORMAT.md §2), also for the node's own."""
    return dequantize_q80(quantize_q80(p)).reshape(p.shape)


