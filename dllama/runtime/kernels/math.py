"""The math kernels, serial over a range of rows (heads, blocks) and in numba-parallel forms:
q80 quantization, the quantized and f32 matmuls, silu, attention over the KV cache, rmsnorm."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from dllama.f16bits import f16_bits_to_f32_bits, f32_bits_to_f16_bits, round_to_f16
from dllama.formats import BLOCK_SIZE, Q40_BYTES, Q80_BYTES
from dllama.runtime.kernels.ir import (
    GROUP_ROWS,
    GROUP_TOKENS,
    LANES,
    X_BIAS,
    _head_scores,
    _q40_group_1tokens,
    _q40_group_2tokens,
    _q40_group_3tokens,
    _q40_group_4tokens,
    _q80_group_1tokens,
    _q80_group_2tokens,
    _q80_group_3tokens,
    _q80_group_4tokens,
    _quantize_q80_block,
    _silu_gate8,
    _softmax_scaled,
    _weighted_rows,
)

ROWS_PER_TASK = 16     # rows one thread takes at a time in the matmuls
BLOCKS_PER_TASK = 64   # q80 blocks one thread quantizes at a time


@njit(cache=True, inline="always")
def _scale(row, offset, scale_table):
    return scale_table[np.int32(row[offset]) | (np.int32(row[offset + 1]) << 8)]


# --------------------------------------------------------------------------------------------
# Activation quantization (the reference q80 quantizer, FORMAT.md §1.2)

@njit(cache=True, inline="always")
def _q80_scale(x, t, x0):
    """The reference q80 scale of the block x[t, x0:x0+32] (FORMAT.md §1.2): d = amax / 127, and 1/d."""
    amax = np.float32(0.0)
    for j in range(BLOCK_SIZE):
        amax = max(amax, abs(x[t, x0 + j]))
    d = amax / np.float32(127.0)
    return d, (np.float32(1.0) / d if d != 0 else np.float32(0.0))


@njit(cache=True)
def quantize_q80_tasks(x, xq, xd, xc, task0, task1):
    """Blocks task0..task1 (numbered t * n/32 + b) of x (T, n) float32 -> xq (T, n) int8, xd (T, n/32)
    float32 scales (f16-rounded) and xc (T, nb) int32 = -8 * each block's sum of xq (the q40 nibble
    offset, folded out)."""
    nb = x.shape[1] // BLOCK_SIZE
    for task in range(task0, task1):
        t = task // nb
        b = task % nb
        xd[t, b] = round_to_f16(_quantize_q80_block(x[t], b * BLOCK_SIZE, xq[t], xc[t], b))


@njit(cache=True, parallel=True)
def quantize_q80(x, xq, xd, xc):
    """All of x, a chunk of blocks per thread (quantize_q80_tasks)."""
    n_tasks = x.shape[0] * (x.shape[1] // BLOCK_SIZE)
    for chunk in prange((n_tasks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        quantize_q80_tasks(x, xq, xd, xc, chunk * BLOCKS_PER_TASK, min(n_tasks, (chunk + 1) * BLOCKS_PER_TASK))


@njit(cache=True)
def q80_roundtrip_blocks(x, t, b0, b1):
    """Blocks b0..b1 of token t of x (T, n) -> their q80 quantized-then-dequantized values, in place."""
    for b in range(b0, b1):
        x0 = b * BLOCK_SIZE
        d, inv = _q80_scale(x, t, x0)
        ds = round_to_f16(d)
        for j in range(BLOCK_SIZE):
            x[t, x0 + j] = np.float32(np.rint(x[t, x0 + j] * inv)) * ds


@njit(cache=True)
def q80_roundtrip(x):
    """x (T, n) -> its q80 quantized-then-dequantized value, in place (FORMAT.md §2 partials)."""
    for t in range(x.shape[0]):
        q80_roundtrip_blocks(x, t, 0, x.shape[1] // BLOCK_SIZE)


@njit(cache=True)
def q80_encode(x, wire):
    """x (T, n) -> wire (T * n/32 * 34,) uint8: its q80 blocks as the reference stores them (FORMAT.md
    §1.2: f16 d, 32 int8), numpy's formats.quantize_q80 bit for bit."""
    T, n = x.shape
    nb = n // BLOCK_SIZE
    for t in range(T):
        for b in range(nb):
            x0 = b * BLOCK_SIZE
            d, inv = _q80_scale(x, t, x0)
            bits = f32_bits_to_f16_bits(np.float32(d).view(np.uint32))
            o = (t * nb + b) * Q80_BYTES
            wire[o] = np.uint8(bits & 255)
            wire[o + 1] = np.uint8(bits >> 8)
            for j in range(BLOCK_SIZE):
                wire[o + 2 + j] = np.uint8(np.int32(np.rint(x[t, x0 + j] * inv)) & 255)


@njit(cache=True)
def q80_decode(wire, out):
    """wire (T * n/32 * 34,) uint8 q80 blocks -> out (T, n) float32: q * d, as formats.dequantize_q80."""
    T, n = out.shape
    nb = n // BLOCK_SIZE
    for t in range(T):
        for b in range(nb):
            o = (t * nb + b) * Q80_BYTES
            ds = np.uint32(f16_bits_to_f32_bits(np.uint32(wire[o]) | (np.uint32(wire[o + 1]) << 8))).view(np.float32)
            for j in range(BLOCK_SIZE):
                out[t, b * BLOCK_SIZE + j] = np.float32(np.int8(wire[o + 2 + j])) * ds


# --------------------------------------------------------------------------------------------
# Quantized matmuls: out (T, rows) = x (T, n) . w (rows, n)^T
#
# Every kernel computes the same numbers in the same order, so a batched prompt equals the
# token-by-token result bit for bit: per block, the exact integer sum of its 32 products, times
# f32(d_w * d_x), added into the row's one float32 total, block after block (ir._group_kernel).

@njit(cache=True, inline="always")
def _lane_sum(acc, offset):
    total = np.float32(0.0)
    for i in range(LANES):
        total += acc[offset + i]
    return total


@njit(cache=True, inline="always")
def _group_tokens(w, block_bytes, g, xq, xc, xd, t0, n, scale_table, acc):
    """acc[16j:+16] = group g's 16 rows (q40 or q80 by block_bytes) times tokens t0..t0+n (n 1..GROUP_TOKENS)."""
    if block_bytes == Q40_BYTES:
        if n == 4:
            _q40_group_4tokens(w, g, xq, xc, xd, t0, scale_table, acc)
        elif n == 3:
            _q40_group_3tokens(w, g, xq, xc, xd, t0, scale_table, acc)
        elif n == 2:
            _q40_group_2tokens(w, g, xq, xc, xd, t0, scale_table, acc)
        else:
            _q40_group_1tokens(w, g, xq, xc, xd, t0, scale_table, acc)
    elif n == 4:
        _q80_group_4tokens(w, g, xq, xc, xd, t0, scale_table, acc)
    elif n == 3:
        _q80_group_3tokens(w, g, xq, xc, xd, t0, scale_table, acc)
    elif n == 2:
        _q80_group_2tokens(w, g, xq, xc, xd, t0, scale_table, acc)
    else:
        _q80_group_1tokens(w, g, xq, xc, xd, t0, scale_table, acc)


@njit(cache=True, inline="always")
def _group_rows(w, block_bytes, xq, xd, xc, scale_table, out, r0, r1):
    """out[:, r0:r1] for interleaved weights (interleave_q40, interleave_q80), tokens GROUP_TOKENS at a time past
    each group of 16 rows (its blocks stay in cache between passes). w has whole groups (the interleaving pads
    the last one): its padding rows are computed, not written."""
    T = xq.shape[0]
    acc = np.empty(GROUP_TOKENS * GROUP_ROWS, dtype=np.float32)
    for g in range(r0 // GROUP_ROWS, (r1 + GROUP_ROWS - 1) // GROUP_ROWS):
        first, last = max(r0, g * GROUP_ROWS), min(r1, (g + 1) * GROUP_ROWS)
        for t0 in range(0, T, GROUP_TOKENS):
            n = min(GROUP_TOKENS, T - t0)
            _group_tokens(w, block_bytes, g, xq, xc, xd, t0, n, scale_table, acc)
            for j in range(n):
                for r in range(first, last):
                    out[t0 + j, r] = acc[j * GROUP_ROWS + r - g * GROUP_ROWS]


@njit(cache=True)
def matvec_q40_rows(w, xq, xd, xc, scale_table, out, r0, r1):
    """One token, rows r0..r1: w interleaved q40 (interleave_q40), xq (n,) int8, xd (nb,), xc (nb,) -> out (rows,)."""
    _group_rows(w, Q40_BYTES, xq.reshape((1, xq.shape[0])), xd.reshape((1, xd.shape[0])),
                xc.reshape((1, xc.shape[0])), scale_table, out.reshape((1, out.shape[0])), r0, r1)


@njit(cache=True, inline="always")
def _interleave(w, out, block_bytes, bias):
    """w (rows, nb * block_bytes) rows as the .m stores them (any strides) -> out (rows rounded up to 16, same
    row bytes), C-contiguous, in groups of 16 rows (ir.GROUP_ROWS): per block the runs of the 16 rows' bytes
    4k..4k+3 of the block's values (q80's int8 values plus `bias`), then their scales; missing rows are zero."""
    rows, row_bytes = w.shape
    nb = row_bytes // block_bytes
    value_bytes = block_bytes - 2
    flat = out.reshape(out.size)
    flat[rows // GROUP_ROWS * GROUP_ROWS * row_bytes:] = 0
    for r in range(rows):
        g, i = r // GROUP_ROWS, r % GROUP_ROWS
        row = w[r]
        for b in range(nb):
            src = b * block_bytes
            dst = g * GROUP_ROWS * row_bytes + b * GROUP_ROWS * block_bytes
            flat[dst + GROUP_ROWS * value_bytes + 2 * i] = row[src]
            flat[dst + GROUP_ROWS * value_bytes + 2 * i + 1] = row[src + 1]
            for k in range(value_bytes // 4):
                for j in range(4):
                    flat[dst + 64 * k + 4 * i + j] = np.uint8((np.int32(row[src + 2 + 4 * k + j]) + bias) & 255)


@njit(cache=True)
def interleave_q40(w, out):
    """q40 rows (rows, nb * 18) -> the q40 kernels' groups of 16 rows (_interleave)."""
    _interleave(w, out, Q40_BYTES, 0)


@njit(cache=True)
def interleave_q80(w, out):
    """q80 rows (rows, nb * 34) -> the q80 kernels' groups of 16 rows (_interleave; +128 on VNNI, ir.X_BIAS)."""
    _interleave(w, out, Q80_BYTES, X_BIAS)


@njit(cache=True)
def matmul_q40_rows(w, xq, xd, xc, scale_table, out, r0, r1):
    """Interleaved q40 weights (interleave_q40) x T tokens, rows r0..r1: every token gets matvec_q40_rows'
    bits."""
    _group_rows(w, Q40_BYTES, xq, xd, xc, scale_table, out, r0, r1)


@njit(cache=True)
def matmul_q80_rows(w, xq, xd, xc, scale_table, out, r0, r1):
    """Interleaved q80 weights (interleave_q80) x T tokens, rows r0..r1: a token's row has the same bits beside
    any others (_group_rows)."""
    _group_rows(w, Q80_BYTES, xq, xd, xc, scale_table, out, r0, r1)


# The numba-parallel forms: ROWS_PER_TASK rows per task, each through the serial kernel above.

@njit(cache=True, parallel=True)
def matvec_q40(w, xq, xd, xc, scale_table, out):
    rows = out.shape[0]  # w: interleave_q40's rows, padded
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        matvec_q40_rows(w, xq, xd, xc, scale_table, out, task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


@njit(cache=True, parallel=True)
def matmul_q40(w, xq, xd, xc, scale_table, out):
    rows = out.shape[1]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        matmul_q40_rows(w, xq, xd, xc, scale_table, out, task * ROWS_PER_TASK,
                        min(rows, (task + 1) * ROWS_PER_TASK))


@njit(cache=True, parallel=True)
def matmul_q80(w, xq, xd, xc, scale_table, out):
    rows = out.shape[1]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        matmul_q80_rows(w, xq, xd, xc, scale_table, out, task * ROWS_PER_TASK,
                        min(rows, (task + 1) * ROWS_PER_TASK))


# --------------------------------------------------------------------------------------------
# f32 weights: the same sums on every CPU. numpy's matmul hands them to BLAS, whose summation
# order depends on the library and the CPU's vector width (x86 and aarch64 logits differed in
# the last bits); here product j of a dot goes into lane j % 16, lanes are summed in order.

@njit(cache=True)
def matmul_f32_rows(w, x, out, r0, r1):
    """f32 weights (rows, n) x T tokens (T, n) float32 -> out (T, rows), rows r0..r1. Tokens go 4 at
    a time past each row (one load of the row serves 4 dots: 4x faster prefill), each dot in the
    one order, so a batch equals token-by-token bit for bit."""
    T, n = x.shape
    whole = n - n % LANES
    acc = np.empty((4, LANES), dtype=np.float32)
    for r in range(r0, r1):
        row = w[r]
        t = 0
        while t < T:
            group = 4 if T - t >= 4 else 1
            acc[:] = 0.0
            if group == 4:
                x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
                for j in range(0, whole, LANES):
                    for i in range(LANES):
                        v = row[j + i]
                        acc[0, i] += v * x0[j + i]
                        acc[1, i] += v * x1[j + i]
                        acc[2, i] += v * x2[j + i]
                        acc[3, i] += v * x3[j + i]
            else:
                x0 = x[t]
                for j in range(0, whole, LANES):
                    for i in range(LANES):
                        acc[0, i] += row[j + i] * x0[j + i]
            for k in range(group):
                xt = x[t + k]
                total = _lane_sum(acc[k], 0)
                for j in range(whole, n):
                    total += row[j] * xt[j]
                out[t + k, r] = total
            t += group


@njit(cache=True, parallel=True)
def matmul_f32(w, x, out):
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        matmul_f32_rows(w, x, out, task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


# --------------------------------------------------------------------------------------------
# Attention over the KV cache (FORMAT.md §2)

@njit(cache=True)
def silu_gate_span(a, b, out, i0, i1):
    """out[i0:i1] = silu(a) * b of one token's values, in float64, rounded once to float32 (see model.py):
    8 at a time by ir._silu_gate8, the last (i1 - i0) % 8 by the same formula in scalars (libm's exp)."""
    i = i0
    while i + 8 <= i1:
        _silu_gate8(a, b, out, i)
        i += 8
    for j in range(i, i1):
        x = np.float64(a[j])
        out[j] = x / (1.0 + np.exp(-x)) * b[j]


@njit(cache=True)
def silu_gate_rows(a, b, out, t0, t1):
    """out = silu(a) * b elementwise for tokens t0..t1 (silu_gate_span)."""
    for t in range(t0, t1):
        silu_gate_span(a[t], b[t], out[t], 0, a.shape[1])


@njit(cache=True, parallel=True)
def silu_gate(a, b, out):
    for t in prange(a.shape[0]):
        silu_gate_rows(a, b, out, t, t + 1)


@njit(cache=True)
def attention_tasks(q, k_cache, v_cache, pos0, out, task0, task1):
    """Heads task0..task1 (numbered t * H + h) of q (T, H, hd), tokens at positions pos0..pos0+T-1;
    the caches (KVH, S, hd) already hold them.

    out (T, H * hd): per head, softmax(q.k_t / sqrt(hd)) over t <= pos, times v. With hd a multiple of 8
    the dot products and the weighted sum of v are float32 vectors summed in one fixed order
    (ir._head_scores, ir._weighted_rows), the softmax float64; other hd run scalar loops in float64.
    """
    T, H, hd = q.shape
    KVH, S = k_cache.shape[0], k_cache.shape[1]
    group = H // KVH
    inv_sqrt = 1.0 / np.sqrt(hd)
    scores = np.empty((pos0 + T + 7) // 8 * 8, dtype=np.float64)
    for task in range(task0, task1):
        t = task // H
        h = task % H
        base = (h // group) * S * hd
        n = pos0 + t + 1
        head_out = out[t, h * hd:(h + 1) * hd]
        if hd % 8 == 0:
            _head_scores(q[t, h], k_cache, base, hd, n, scores)
        else:
            _head_scores_scalar(q[t, h], k_cache, base, hd, n, scores)
        _softmax_scaled(scores, n, inv_sqrt)
        if hd % 8 == 0:
            _weighted_rows(scores, v_cache, base, hd, n, head_out)
        else:
            _weighted_rows_scalar(scores, v_cache, base, hd, n, head_out)


@njit(cache=True)
def _head_scores_scalar(q, k_cache, base, stride, n, scores):
    """ir._head_scores for any hd, the sums in order."""
    kc = k_cache.reshape(-1)
    for s in range(n):
        acc = 0.0
        for i in range(q.shape[0]):
            acc += np.float64(q[i]) * kc[base + s * stride + i]
        scores[s] = acc


@njit(cache=True)
def _weighted_rows_scalar(a, v_cache, base, stride, n, out):
    """ir._weighted_rows for any hd."""
    vc = v_cache.reshape(-1)
    for i in range(out.shape[0]):
        z = 0.0
        for s in range(n):
            z += a[s] * vc[base + s * stride + i]
        out[i] = z


@njit(cache=True, parallel=True)
def attention(q, k_cache, v_cache, pos0, out):
    n_tasks = q.shape[0] * q.shape[1]
    for task in prange(n_tasks):
        attention_tasks(q, k_cache, v_cache, pos0, out, task, task + 1)


@njit(cache=True)
def _pairwise_block(a, start, n):
    """numpy's float64 sum of a[start:start+n], n <= 128: in 8 running sums (fewer than 8: in order)."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[start + i]
        return res
    r0, r1, r2, r3 = a[start], a[start + 1], a[start + 2], a[start + 3]
    r4, r5, r6, r7 = a[start + 4], a[start + 5], a[start + 6], a[start + 7]
    i = 8
    while i < n - n % 8:
        j = start + i
        r0 += a[j]
        r1 += a[j + 1]
        r2 += a[j + 2]
        r3 += a[j + 3]
        r4 += a[j + 4]
        r5 += a[j + 5]
        r6 += a[j + 6]
        r7 += a[j + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[start + i]
        i += 1
    return res


def _pairwise_level(below):
    """numpy's pairwise sum one level up: a run longer than 128 is split in two at a multiple of 8.
    (Levels, not recursion: numba.pycc cannot compile a recursive function.)"""
    @njit  # not cached: twelve closures of one name
    def pairwise(a, start, n):
        if n <= 128:
            return _pairwise_block(a, start, n)
        half = n // 2
        half -= half % 8
        return below(a, start, half) + below(a, start + half, n - half)
    return pairwise


_pairwise_sum = _pairwise_block
for _ in range(12):  # runs up to 128 * 2^12 values
    _pairwise_sum = _pairwise_level(_pairwise_sum)


@njit(cache=True)
def rmsnorm_token(x, weight, eps, out, squares):
    """out = x / sqrt(mean(x^2) + eps) * weight for one token, as model.rmsnorm (float64, numpy's sum)."""
    n = x.shape[0]
    for i in range(n):
        v = np.float64(x[i])
        squares[i] = v * v
    scale = np.sqrt(_pairwise_sum(squares, 0, n) / n + eps)
    for i in range(n):
        out[i] = np.float64(x[i]) / scale * weight[i]

