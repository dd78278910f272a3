"""The hot loops, compiled with numba: array in, array out, no policy.

Quantized weights arrive as their stored bytes viewed as a 2-D uint8 array (rows, row_bytes),
memory-mapped and never dequantized as a whole (FORMAT.md §1.2 block layouts). A column slice
(wo, w2 under tensor parallelism, FORMAT.md §3) is a strided view of the same bytes.
Activations headed for a quantized matmul are q80: int8 values xq (T, n), float32 block scales
xd (T, n/32) already rounded through f16 as the reference stores them.

The inner block products are written as LLVM vector IR (`_q40_block`, `_i8_block`): numba promotes int8/int32
arithmetic to int64, which stops LLVM from vectorising a plain loop; the IR is generic (no
x86 intrinsics), so the same code vectorises on ARM boards. Which kernel runs, on which
slice, with how many threads is decided by the caller (`tensors.py`).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic

BLOCK = 32
Q40_BYTES = 18
Q80_BYTES = 34
ROWS_PER_TASK = 16  # rows one thread takes at a time in the batched kernels

# f16 bits -> float32, so kernels decode block scales with one lookup (numba has no CPU half)
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

_i8, _i32, _f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
LANES = 16  # float32 accumulator lanes per (row, token): lane i sums the products 2i, 2i+1 of each block


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _pointer(context, builder, arrty, arr, offset, vt):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [offset]), vt.as_pointer())


def _accumulate_pairs(builder, w32, x32, scale, acc_ptr):
    """acc[i] += float(w[2i] x[2i] + w[2i+1] x[2i+1]) * scale for i < 16 (LLVM emits pmaddwd-like code)."""
    products = builder.mul(w32, x32)
    even = builder.shuffle_vector(products, products, ir.Constant(_vec(_i32, LANES), list(range(0, 32, 2))))
    odd = builder.shuffle_vector(products, products, ir.Constant(_vec(_i32, LANES), list(range(1, 32, 2))))
    pairs = builder.sitofp(builder.add(even, odd), _vec(_f32, LANES))
    splat = builder.insert_element(ir.Constant(_vec(_f32, LANES), ir.Undefined), scale, ir.Constant(_i32, 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(_vec(_i32, LANES), [0] * LANES))
    acc = builder.load(acc_ptr, align=4)
    builder.store(builder.fadd(acc, builder.fmul(pairs, splat)), acc_ptr, align=4)


@intrinsic
def _q40_block(typingctx, w, w_off, x, x_off, scale, acc, acc_off):
    """acc[acc_off:+16] += pair sums of (nibble - 8) * x over one q40 block at w[w_off] (its 16 bytes), times scale."""
    sig = types.void(w, w_off, x, x_off, scale, acc, acc_off)

    def codegen(context, builder, sig, args):
        w, w_off, x, x_off, scale, acc, acc_off = args
        wv = builder.load(_pointer(context, builder, sig.args[0], w, w_off, _vec(_i8, 16)), align=1)
        xv = builder.load(_pointer(context, builder, sig.args[2], x, x_off, _vec(_i8, 32)), align=1)
        lo = builder.and_(wv, ir.Constant(_vec(_i8, 16), [15] * 16))
        hi = builder.lshr(wv, ir.Constant(_vec(_i8, 16), [4] * 16))
        # byte j holds value j (low nibble) and value j + 16 (high nibble), FORMAT.md §1.2
        nibbles = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_i32, 32), list(range(32))))
        values = builder.sub(builder.zext(nibbles, _vec(_i32, 32)), ir.Constant(_vec(_i32, 32), [8] * 32))
        acc_ptr = _pointer(context, builder, sig.args[5], acc, acc_off, _vec(_f32, LANES))
        _accumulate_pairs(builder, values, builder.sext(xv, _vec(_i32, 32)), scale, acc_ptr)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _i8_block(typingctx, w, w_off, x, x_off, scale, acc, acc_off):
    """acc[acc_off:+16] += pair sums of w * x over 32 int8 values (w may be uint8 bytes holding int8), times scale."""
    sig = types.void(w, w_off, x, x_off, scale, acc, acc_off)

    def codegen(context, builder, sig, args):
        w, w_off, x, x_off, scale, acc, acc_off = args
        wv = builder.load(_pointer(context, builder, sig.args[0], w, w_off, _vec(_i8, 32)), align=1)
        xv = builder.load(_pointer(context, builder, sig.args[2], x, x_off, _vec(_i8, 32)), align=1)
        acc_ptr = _pointer(context, builder, sig.args[5], acc, acc_off, _vec(_f32, LANES))
        _accumulate_pairs(builder, builder.sext(wv, _vec(_i32, 32)), builder.sext(xv, _vec(_i32, 32)), scale, acc_ptr)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _f16_round(x):
    """float32 -> nearest f16 (ties to even) -> float32: the value the reference stores as a scale."""
    ax = abs(x)
    if ax < np.float32(6.103515625e-05):  # f16 subnormal range: a fixed quantum of 2^-24
        return np.float32(np.rint(np.float64(x) * 16777216.0) / 16777216.0)
    if ax >= np.float32(65520.0):
        return np.float32(np.inf) if x > 0 else np.float32(-np.inf)
    bits = np.array([x], dtype=np.float32).view(np.uint32)[0]
    lsb = (bits >> np.uint32(13)) & np.uint32(1)
    bits = (bits + np.uint32(0xFFF) + lsb) & np.uint32(0xFFFFE000)
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


@njit(cache=True, inline="always")
def _scale(row, offset, scale_table):
    return scale_table[np.int32(row[offset]) | (np.int32(row[offset + 1]) << 8)]


# --------------------------------------------------------------------------------------------
# Activation quantization (the reference q80 quantizer, FORMAT.md §1.2)

@njit(cache=True, parallel=True)
def quantize_q80(x, xq, xd):
    """x (T, n) float32 -> xq (T, n) int8, xd (T, n/32) float32 scales (f16-rounded)."""
    T, n = x.shape
    nb = n // BLOCK
    for task in prange(T * nb):
        t = task // nb
        b = task % nb
        x0 = b * BLOCK
        amax = np.float32(0.0)
        for j in range(BLOCK):
            amax = max(amax, abs(x[t, x0 + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        for j in range(BLOCK):
            xq[t, x0 + j] = np.int8(np.rint(x[t, x0 + j] * inv))
        xd[t, b] = _f16_round(d)


@njit(cache=True)
def q80_roundtrip(x):
    """x (T, n) -> its q80 quantized-then-dequantized value, in place (FORMAT.md §2 partials)."""
    T, n = x.shape
    for t in range(T):
        for b in range(n // BLOCK):
            x0 = b * BLOCK
            amax = np.float32(0.0)
            for j in range(BLOCK):
                amax = max(amax, abs(x[t, x0 + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            ds = _f16_round(d)
            for j in range(BLOCK):
                x[t, x0 + j] = np.float32(np.rint(x[t, x0 + j] * inv)) * ds


# --------------------------------------------------------------------------------------------
# Quantized matmuls: out (T, rows) = x (T, n) . w (rows, n)^T
#
# Every kernel computes the same numbers in the same order (so a batched prompt equals the
# token-by-token result bit for bit): per block, 16 exact integer pair sums, each times
# f32(d_w * d_x), added block after block into 16 float32 lanes; the lanes are summed in order.

@njit(cache=True, inline="always")
def _lane_sum(acc, offset):
    total = np.float32(0.0)
    for i in range(LANES):
        total += acc[offset + i]
    return total


@njit(cache=True, parallel=True)
def matvec_q40(w, xq, xd, scale_table, out):
    """One token: w (rows, nb * 18) uint8, xq (n,) int8, xd (nb,) -> out (rows,)."""
    rows = w.shape[0]
    nb = xd.shape[0]
    for r in prange(rows):
        acc = np.zeros(LANES, dtype=np.float32)
        row = w[r]
        for b in range(nb):
            o = b * Q40_BYTES
            _q40_block(row, o + 2, xq, b * BLOCK, _scale(row, o, scale_table) * xd[b], acc, 0)
        out[r] = _lane_sum(acc, 0)


@njit(cache=True, parallel=True)
def matvec_q80(w, xq, xd, scale_table, out):
    """One token: w (rows, nb * 34) uint8 (q80 weights)."""
    rows = w.shape[0]
    nb = xd.shape[0]
    for r in prange(rows):
        acc = np.zeros(LANES, dtype=np.float32)
        row = w[r]
        for b in range(nb):
            o = b * Q80_BYTES
            _i8_block(row, o + 2, xq, b * BLOCK, _scale(row, o, scale_table) * xd[b], acc, 0)
        out[r] = _lane_sum(acc, 0)


@njit(cache=True, parallel=True)
def matmul_q40(w, xq, xd, scale_table, out):
    """T tokens per pass over the weights: each row is unpacked once to int8 (value - 8) and its
    scales decoded once, then multiplied with every token while it sits in L1."""
    rows = w.shape[0]
    T, nb = xd.shape
    n_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        unpacked = np.empty(nb * BLOCK, dtype=np.int8)
        scales = np.empty(nb, dtype=np.float32)
        acc = np.empty(T * LANES, dtype=np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            row = w[r]
            for b in range(nb):
                o = b * Q40_BYTES
                scales[b] = _scale(row, o, scale_table)
                for j in range(16):
                    byte = row[o + 2 + j]
                    unpacked[b * BLOCK + j] = np.int8(byte & 15) - 8
                    unpacked[b * BLOCK + 16 + j] = np.int8(byte >> 4) - 8
            acc[:] = 0.0
            for b in range(nb):
                for t in range(T):
                    _i8_block(unpacked, b * BLOCK, xq[t], b * BLOCK, scales[b] * xd[t, b], acc, t * LANES)
            for t in range(T):
                out[t, r] = _lane_sum(acc, t * LANES)


@njit(cache=True, parallel=True)
def matmul_q80(w, xq, xd, scale_table, out):
    rows = w.shape[0]
    T, nb = xd.shape
    n_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        scales = np.empty(nb, dtype=np.float32)
        acc = np.empty(T * LANES, dtype=np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            row = w[r]
            for b in range(nb):
                scales[b] = _scale(row, b * Q80_BYTES, scale_table)
            acc[:] = 0.0
            for b in range(nb):
                for t in range(T):
                    _i8_block(row, b * Q80_BYTES + 2, xq[t], b * BLOCK, scales[b] * xd[t, b], acc, t * LANES)
            for t in range(T):
                out[t, r] = _lane_sum(acc, t * LANES)


# --------------------------------------------------------------------------------------------
# Attention over the KV cache (FORMAT.md §2)

@njit(cache=True, parallel=True)
def attention(q, k_cache, v_cache, pos0, out):
    """q (T, H, hd) of tokens at positions pos0..pos0+T-1; caches (S, KVH, hd) already hold them.

    out (T, H * hd): per head, softmax(q.k_t / sqrt(hd)) over t <= pos, times v. Sums run in
    float64 so the float32 result does not depend on their order (see model.py).
    """
    T, H, hd = q.shape
    group = H // k_cache.shape[1]
    inv_sqrt = 1.0 / np.sqrt(hd)
    for task in prange(T * H):
        t = task // H
        h = task % H
        kv = h // group
        n = pos0 + t + 1
        scores = np.empty(n, dtype=np.float64)
        smax = -np.inf
        for s in range(n):
            acc = 0.0
            for i in range(hd):
                acc += np.float64(q[t, h, i]) * k_cache[s, kv, i]
            acc *= inv_sqrt
            scores[s] = acc
            smax = max(smax, acc)
        total = 0.0
        for s in range(n):
            e = np.exp(scores[s] - smax)
            scores[s] = e
            total += e
        z = np.zeros(hd, dtype=np.float64)
        for s in range(n):
            a = scores[s] / total
            for i in range(hd):
                z[i] += a * v_cache[s, kv, i]
        for i in range(hd):
            out[t, h * hd + i] = z[i]
