"""One node's share of the forward pass (FORMAT.md §2 cut by §3): its heads, its FFN rows, its
logits rows. Each step returns the node's partial `dim` vectors; summing the partials of all
nodes in node order is the caller's job (the exchange seams).

Provisional numpy arithmetic of the same quantized maths (q80 activations against q40/q80
weights, f32 against f32) until the single-node runtime's kernels can be called per slice.
"""
from __future__ import annotations

import math

import numpy as np

from dllama.formats import (
    Q40_BLOCK, Q80_BLOCK, FloatType, ModelHeader, RopeType, dequantize_q80, quantize_q80, tensor_plan,
)
from dllama.runtime.distributed.plan import slice_shape


def typed_slice(raw: np.ndarray, shape: tuple[int, ...], float_type: FloatType) -> np.ndarray:
    """Slice bytes -> float array of `shape`, or (rows, blocks) records for quantized matrices."""
    if float_type == FloatType.F32:
        return raw.view("<f4").reshape(shape)
    if float_type == FloatType.F16:
        return raw.view("<f2").astype(np.float32).reshape(shape)
    block = Q40_BLOCK if float_type == FloatType.Q40 else Q80_BLOCK
    return raw.view(block).reshape(shape[0], -1)


def _block_ints(w: np.ndarray) -> np.ndarray:
    if w.dtype == Q40_BLOCK:
        qs = w["qs"]
        return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - np.int8(8)
    return w["qs"]


def matmul(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(T, in) activations times a (out, in) weight -> (T, out); quantized weights meet q80 activations."""
    if w.dtype.names is None:
        return x @ w.T
    xq = quantize_q80(x).view(Q80_BLOCK).reshape(x.shape[0], -1)
    wi = _block_ints(w).astype(np.int32)                      # (out, nb, 32)
    xi = xq["qs"].astype(np.int32)                             # (T, nb, 32)
    dots = np.einsum("onk,tnk->ton", wi, xi).astype(np.float32)
    scale = w["d"].astype(np.float32)[None, :, :] * xq["d"].astype(np.float32)[:, None, :]
    return (dots * scale).sum(axis=-1, dtype=np.float32)


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
        keys = self.k_cache[layer, :pos + T].reshape(pos + T, self.kv_heads, hd)
        values = self.v_cache[layer, :pos + T].reshape(pos + T, self.kv_heads, hd)
        group = self.heads // self.kv_heads
        kv_of = np.arange(self.heads) // group
        scores = np.einsum("thd,shd->hts", q, keys[:, kv_of]) / np.float32(math.sqrt(hd))
        causal = np.arange(pos + T)[None, :] > (pos + np.arange(T))[:, None]
        scores[:, causal] = -np.inf
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        z = np.einsum("hts,shd->thd", scores.astype(np.float32), values[:, kv_of])
        return z.reshape(T, -1).astype(np.float32)

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


