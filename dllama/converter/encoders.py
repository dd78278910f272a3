"""numba kernels: source tensor bits (bf16 / f16 / f32) -> `.m` bytes (f32 / f16 / q40 / q80) in one pass.

Array in, array out; the converter decides chunking and order. Each kernel reads rows of a
source chunk in the order given by `order` (the rotary permute of FORMAT.md §1.3 is a row
gather) and writes one output row per entry, in parallel over rows. The arithmetic is the
float32 arithmetic of formats.quantize_q40 / quantize_q80 / numpy's float16 cast, step for
step, so the bytes are identical (tests/test_convert_kernels.py checks it).

Source rows arrive as unsigned integers: uint16 for bf16 and f16, uint32 for f32 (its bits).

`encode_q40_search` is the error-aware q40 encoder: the same block layout, with each block's scale
chosen among candidates to minimise the importance-weighted squared error of the stored values.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from dllama.f16bits import f16_bits_to_f32_bits as _f16_bits_to_f32_bits
from dllama.f16bits import f32_bits_to_f16_bits as _f32_bits_to_f16_bits
from dllama.formats import BLOCK_SIZE, Q40_BYTES, Q80_BYTES, SCALE_BYTES

SRC_BF16 = 0
SRC_F16 = 1
SRC_F32 = 2
HALF_BLOCK = BLOCK_SIZE // 2  # a q40 byte holds value j (low nibble) and value j + HALF_BLOCK (high)

_jit = dict(nogil=True, cache=True)


@numba.njit(inline="always", **_jit)
def _widen_row(src_row, kind, out_bits):
    """One source row -> float32 bits in out_bits (exact: bf16 and f16 embed in f32)."""
    n = src_row.shape[0]
    if kind == SRC_BF16:
        for j in range(n):
            out_bits[j] = np.uint32(src_row[j]) << np.uint32(16)
    elif kind == SRC_F16:
        for j in range(n):
            out_bits[j] = _f16_bits_to_f32_bits(src_row[j])
    else:
        for j in range(n):
            out_bits[j] = np.uint32(src_row[j])


@numba.njit(parallel=True, **_jit)
def encode_f32(src, kind, order, out):
    """out: (len(order), cols) uint32 bits of float32."""
    for r in prange(order.shape[0]):
        _widen_row(src[order[r]], kind, out[r])


@numba.njit(parallel=True, **_jit)
def encode_f16(src, kind, order, out):
    """out: (len(order), cols) uint16 bits of float16."""
    cols = src.shape[1]
    for r in prange(order.shape[0]):
        bits = np.empty(cols, np.uint32)
        _widen_row(src[order[r]], kind, bits)
        row = out[r]
        for j in range(cols):
            row[j] = _f32_bits_to_f16_bits(bits[j])


@numba.njit(parallel=True, **_jit)
def encode_q40(src, kind, order, out):
    """out: (len(order), cols / BLOCK_SIZE * Q40_BYTES) uint8 q40 blocks (FORMAT.md §1.2)."""
    for r in prange(order.shape[0]):
        _encode_row(src[order[r]], kind, out[r], _q40_block, Q40_BYTES)


@numba.njit(parallel=True, **_jit)
def encode_q40_search(src, kind, order, column_scale, importance, out):
    """out as encode_q40's. Each block's scale is the candidate with the least weighted squared error
    of the stored values (FORMAT.md §1.2 decoding, the f16-rounded scale included): weight
    importance[j] (what column j's error costs, dllama.converter.calibration) times
    sqrt(mean square of the row + x[j]^2), llama.cpp's weighting within a column (quantize_row_q4_0_impl),
    which measured better here than the importance alone. The reference's scale is a candidate, so
    no block is worse than encode_q40's under that weighting. Each source row is first multiplied by
    column_scale (the channel scales of calibration.Fold; ones for none).

    Rows are searched in groups, each as a (value j of a block, block) array: every step then runs
    along a group's blocks, so it vectorizes while each block's sums keep the order j = 0..31 (IEEE,
    no fastmath: the same bytes on every machine and from a cold or a warm numba cache)."""
    rows = order.shape[0]
    group, importance_t = _search_groups(src.shape[1], importance)
    for g in prange((rows + group - 1) // group):
        r0 = g * group
        r1 = min(rows, r0 + group)
        _search_rows(src, kind, order[r0:r1], column_scale, importance_t, out[r0:r1])


@numba.njit(**_jit)
def encode_q40_search_serial(src, kind, order, column_scale, importance, out):
    """encode_q40_search on the calling thread alone, for a few rows (the calibration's trials):
    waking the pool's threads would cost more than the work, on a loaded machine many times more."""
    rows = order.shape[0]
    group, importance_t = _search_groups(src.shape[1], importance)
    for r0 in range(0, rows, group):
        r1 = min(rows, r0 + group)
        _search_rows(src, kind, order[r0:r1], column_scale, importance_t, out[r0:r1])


@numba.njit(**_jit)
def _search_groups(cols, importance):
    """Rows per group, and the importance of a group's blocks as (value j of a block, block)."""
    n_blocks = cols // BLOCK_SIZE
    group = max(1, SEARCH_GROUP_BLOCKS // n_blocks)
    importance_t = np.empty((BLOCK_SIZE, group * n_blocks), np.float32)
    for r in range(group):
        for b in range(n_blocks):
            for j in range(BLOCK_SIZE):
                importance_t[j, r * n_blocks + b] = importance[b * BLOCK_SIZE + j]
    return group, importance_t


SEARCH_GROUP_BLOCKS = 1024  # blocks searched together: long vector loops, a group's arrays in L2
# divisors of the signed absmax tried beside the reference's -8
SEARCH_DIVISORS = np.array([-7.0, -7.5, -8.5, -9.0], np.float32)


@numba.njit(**_jit)
def _search_rows(src, kind, order, column_scale, importance_t, out):
    """encode_q40_search for a group of rows: their blocks side by side."""
    n_rows, cols = order.shape[0], src.shape[1]
    n_blocks = cols // BLOCK_SIZE
    n = n_rows * n_blocks
    x = np.empty((BLOCK_SIZE, n), np.float32)
    bits = np.empty(cols, np.uint32)
    values = bits.view(np.float32)
    for r in range(n_rows):
        _widen_row(src[order[r]], kind, bits)
        for j in range(BLOCK_SIZE):
            _scaled_column(values[j:], column_scale[j:], x[j, r * n_blocks:(r + 1) * n_blocks])
    # the weights: importance times sqrt(mean square of the row + x^2)
    squares = np.zeros(n, np.float32)
    for j in range(BLOCK_SIZE):
        _add_squares(x[j], squares)
    mean_square = np.empty(n, np.float32)  # of each block's row
    for r in range(n_rows):
        row_sum = np.float32(0.0)
        for b in range(r * n_blocks, (r + 1) * n_blocks):
            row_sum += squares[b]
        mean_square[r * n_blocks:(r + 1) * n_blocks] = row_sum / np.float32(cols)
    w = np.empty_like(x)
    for j in range(BLOCK_SIZE):
        _weights(x[j], importance_t[j, :n], mean_square, w[j])
    _store_q40(x, _search_scales(x, w), out)


@numba.njit(**_jit)
def _scaled_column(values, scale, out):
    """out[b] = values[b * BLOCK_SIZE] * scale[b * BLOCK_SIZE]: value j of every block (the arrays
    start at j)."""
    for b in range(out.shape[0]):
        out[b] = values[b * BLOCK_SIZE] * scale[b * BLOCK_SIZE]


@numba.njit(**_jit)
def _add_squares(xj, squares):
    for b in range(xj.shape[0]):
        squares[b] += xj[b] * xj[b]


@numba.njit(**_jit)
def _weights(xj, importance, mean_square, out):
    for b in range(xj.shape[0]):
        out[b] = importance[b] * np.sqrt(mean_square[b] + xj[b] * xj[b])


@numba.njit(**_jit)
def _search_scales(x, w):
    """The f16 bits of each block's scale: the reference's (absmax / -8) or, if better, the weighted
    least-squares scale of the best levels among those the reference's divisor and each of
    SEARCH_DIVISORS give. Errors are those of a candidate's own levels at its f16 scale; storing
    re-rounds every value to the level nearest at the chosen scale, which can only lower it, so no
    block is worse than the reference's (whose levels are floor(x / d + 0.5) clamped, the same as
    its trunc(clip(x / d + 8.5))). x, w: (BLOCK_SIZE, blocks)."""
    n_blocks = x.shape[1]
    mx = x[0].copy()
    mn = x[0].copy()
    sxx = np.zeros(n_blocks, np.float32)
    wx = np.empty_like(w)
    for j in range(BLOCK_SIZE):
        _block_extremes_and_norm(x[j], w[j], wx[j], mx, mn, sxx)
    m = np.empty(n_blocks, np.float32)  # the reference's signed absmax (a tie takes max), +0 for zero
    ref_bits = np.empty(n_blocks, np.uint16)
    for b in range(n_blocks):
        m[b] = mn[b] if -mn[b] > mx[b] else mx[b]
        if m[b] == 0:
            m[b] = np.float32(0.0)
        ref_bits[b] = _f32_to_f16(m[b] / np.float32(-8.0))
    # candidates compared at their exact least-squares scale (error sxx - sxl^2 / sll), the winner
    # then rounded to f16 and kept only if it still beats the reference's stored scale
    ref_err = np.empty(n_blocks, np.float64)
    best_err = np.full(n_blocks, np.inf, np.float32)
    best_sxl = np.zeros(n_blocks, np.float32)
    best_sll = np.zeros(n_blocks, np.float32)
    inv = np.empty(n_blocks, np.float32)
    sxl = np.empty(n_blocks, np.float32)
    sll = np.empty(n_blocks, np.float32)
    for k in range(-1, SEARCH_DIVISORS.shape[0]):
        for b in range(n_blocks):
            if m[b] == 0:
                inv[b] = np.float32(0.0)  # an all-zero block: every level 0, no candidate
            elif k < 0:
                inv[b] = np.float32(1.0) / (m[b] / np.float32(-8.0))
            else:
                inv[b] = SEARCH_DIVISORS[k] / m[b]
        sxl[:] = 0
        sll[:] = 0
        for j in range(BLOCK_SIZE):
            _add_level_sums(x[j], w[j], wx[j], inv, sxl, sll)
        if k < 0:
            for b in range(n_blocks):
                ref_err[b] = _error(sxx[b], sxl[b], sll[b], _f16_value(ref_bits[b]))
        _keep_better(sxx, sxl, sll, best_err, best_sxl, best_sll)
    scales = ref_bits
    for b in range(n_blocks):
        if best_sll[b] > 0:
            candidate = _f32_to_f16(best_sxl[b] / best_sll[b])
            if _error(sxx[b], best_sxl[b], best_sll[b], _f16_value(candidate)) < ref_err[b]:
                scales[b] = candidate
    return scales


@numba.njit(error_model="numpy", **_jit)  # sll 0 gives inf or nan, not an exception
def _keep_better(sxx, sxl, sll, best_err, best_sxl, best_sll):
    for b in range(sxx.shape[0]):
        err = sxx[b] - sxl[b] * sxl[b] / sll[b]
        better = (sll[b] > 0) & (err < best_err[b])
        best_err[b] = err if better else best_err[b]
        best_sxl[b] = sxl[b] if better else best_sxl[b]
        best_sll[b] = sll[b] if better else best_sll[b]


@numba.njit(**_jit)
def _store_q40(x, scales, out):
    """The blocks of x (BLOCK_SIZE, rows * blocks) at their f16 scales, as q40 rows of out."""
    n_rows = out.shape[0]
    n_blocks = x.shape[1] // n_rows
    inv = np.empty(x.shape[1], np.float32)
    for b in range(x.shape[1]):
        d = _f16_value(scales[b])
        inv[b] = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    packed = np.empty((HALF_BLOCK, x.shape[1]), np.uint8)
    for j in range(HALF_BLOCK):
        _pack_nibbles(x[j], x[j + HALF_BLOCK], inv, packed[j])
    for r in range(n_rows):
        row = out[r]
        for b in range(n_blocks):
            bits = scales[r * n_blocks + b]
            o = b * Q40_BYTES
            row[o] = np.uint8(bits & np.uint16(0xFF))
            row[o + 1] = np.uint8(bits >> np.uint16(8))
            for j in range(HALF_BLOCK):
                row[o + SCALE_BYTES + j] = packed[j, r * n_blocks + b]


@numba.njit(**_jit)
def _pack_nibbles(lo, hi, inv, out):
    for b in range(out.shape[0]):
        low = np.uint8(_q40_level(lo[b] * inv[b]) + np.float32(8.0))
        high = np.uint8(_q40_level(hi[b] * inv[b]) + np.float32(8.0))
        out[b] = low | (high << np.uint8(4))


@numba.njit(**_jit)
def _block_extremes_and_norm(xj, wj, wxj, mx, mn, sxx):
    """Value j of every block: its running max and min, w x, and sum w x^2 so far."""
    for b in range(xj.shape[0]):
        v = xj[b]
        mx[b] = v if v > mx[b] else mx[b]
        mn[b] = v if v < mn[b] else mn[b]
        wxj[b] = wj[b] * v
        sxx[b] += wxj[b] * v


@numba.njit(**_jit)
def _add_level_sums(xj, wj, wxj, inv, sxl, sll):
    """Value j of every block at its candidate's level q: sum w x q and sum w q^2 so far."""
    for b in range(xj.shape[0]):
        q = _q40_level(xj[b] * inv[b])
        sxl[b] += wxj[b] * q
        sll[b] += wj[b] * q * q


@numba.njit(inline="always", **_jit)
def _error(sxx, sxl, sll, d):
    """sum w (x - d q)^2 from sum w x^2, sum w x q and sum w q^2 (in float64: the difference is small)."""
    d = np.float64(d)
    return np.float64(sxx) - 2.0 * d * np.float64(sxl) + d * d * np.float64(sll)


@numba.njit(inline="always", **_jit)
def _f32_to_f16(v):
    return _f32_bits_to_f16_bits(np.float32(v).view(np.uint32))


@numba.njit(inline="always", **_jit)
def _q40_level(v):
    """round(v) clamped to the q40 levels -8..7 (as a float32)."""
    q = np.float32(np.floor(v + np.float32(0.5)))
    q = q if q > np.float32(-8.0) else np.float32(-8.0)
    return q if q < np.float32(7.0) else np.float32(7.0)


@numba.njit(inline="always", **_jit)
def _f16_value(bits):
    return np.uint32(_f16_bits_to_f32_bits(bits)).view(np.float32)


@numba.njit(parallel=True, **_jit)
def encode_q80(src, kind, order, out):
    """out: (len(order), cols / BLOCK_SIZE * Q80_BYTES) uint8 q80 blocks (FORMAT.md §1.2)."""
    for r in prange(order.shape[0]):
        _encode_row(src[order[r]], kind, out[r], _q80_block, Q80_BYTES)


@numba.njit(inline="always", **_jit)
def _encode_row(src_row, kind, row, encode_block, block_bytes):
    """One source row widened to float32, then block by block: encode_block(x, row, offset) writes
    the block's values after its scale and returns the scale, stored last as f16."""
    n_blocks = src_row.shape[0] // BLOCK_SIZE
    values = np.empty(src_row.shape[0], np.float32)
    scales = np.empty(n_blocks, np.float32)
    _widen_row(src_row, kind, values.view(np.uint32))
    for b in range(n_blocks):
        x = values[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]
        scales[b] = encode_block(x, row, b * block_bytes + SCALE_BYTES)
    _store_scales(row, scales, block_bytes)


@numba.njit(inline="always", **_jit)
def _q40_block(x, row, o):
    mx = x[0]
    mn = x[0]
    for j in range(1, BLOCK_SIZE):
        v = x[j]
        if v > mx:
            mx = v
        if v < mn:
            mn = v
    m = mn if -mn > mx else mx  # a tie |min| == max takes max
    if m == 0:
        # all-zero block: numpy's max picks a signed zero by SIMD lane order; we always
        # take +0 (d = -0), numpy's answer for the common all-+0 block
        m = np.float32(0.0)
    d = m / np.float32(-8.0)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    for j in range(HALF_BLOCK):
        lo = _q40_nibble(x[j], inv)
        hi = _q40_nibble(x[j + HALF_BLOCK], inv)
        row[o + j] = lo | (hi << np.uint8(4))
    return d


@numba.njit(inline="always", **_jit)
def _q80_block(x, row, o):
    amax = np.float32(0.0)
    for j in range(BLOCK_SIZE):
        a = abs(x[j])
        if a > amax:
            amax = a
    d = amax / np.float32(127.0)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    for j in range(BLOCK_SIZE):
        row[o + j] = np.uint8(np.int8(np.rint(x[j] * inv)) & 0xFF)
    return d


@numba.njit(inline="always", **_jit)
def _store_scales(row, scales, block_bytes):
    """Each block's float32 scale as little-endian f16 bits at the start of its block."""
    scale_bits = scales.view(np.uint32)
    for b in range(scales.shape[0]):
        h = _f32_bits_to_f16_bits(scale_bits[b])
        row[b * block_bytes] = np.uint8(h & np.uint16(0xFF))
        row[b * block_bytes + 1] = np.uint8(h >> np.uint16(8))


@numba.njit(inline="always", **_jit)
def _q40_nibble(v, inv):
    q = v * inv + np.float32(8.5)
    if q < np.float32(0.0):
        q = np.float32(0.0)
    elif q > np.float32(15.0):
        q = np.float32(15.0)
    return np.uint8(q)  # truncates, like numpy's astype


@numba.njit(parallel=True, **_jit)
def f32_bits_to_f16_bits(bits, out):
    """Elementwise numpy-compatible float32 -> float16 rounding on raw bits (for tests and tools)."""
    for i in prange(bits.shape[0]):
        out[i] = _f32_bits_to_f16_bits(bits[i])


@numba.njit(parallel=True, **_jit)
def f16_bits_to_f32_bits(bits, out):
    for i in prange(bits.shape[0]):
        out[i] = _f16_bits_to_f32_bits(bits[i])


_EXPONENT_MASKS = (0x7F80, 0x7C00, 0x7F800000)  # by SRC_*: all exponent bits set is inf or NaN


@numba.njit(**_jit)
def has_nonfinite(src, kind):
    """Whether any source value is inf or NaN: a weight that would poison every logit at run time.
    One max reduction over the chunk's bits, which vectorizes: ~5% of encode_q40's time on the same
    chunk (a prange form measured slower: its inner loop did not vectorize)."""
    mask = src.dtype.type(_EXPONENT_MASKS[kind])
    flat = src.reshape(-1)
    top = src.dtype.type(0)
    for j in range(flat.shape[0]):  # the exponent field is all ones only for inf and NaN
        top = max(top, flat[j] & mask)
    return top == mask
