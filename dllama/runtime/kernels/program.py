"""Layer programs: a stretch of the forward pass (or a whole token) as one compiled call, run by
the calling thread and the team's helpers over one table of ops with spin barriers between."""
from __future__ import annotations

import numba
import numpy as np
from numba import njit

from dllama.formats import BLOCK_SIZE
from dllama.runtime.kernels.ir import (
    _address,
    _arg1,
    _arg2,
    _arg3,
    _load_acquire,
    _pointer,
    _store_release,
    _yield_cpu,
)
from dllama.runtime.kernels.math import (
    attention_tasks,
    matmul_f32_rows,
    matmul_q40_rows,
    matmul_q80_rows,
    q80_roundtrip_blocks,
    quantize_q80_tasks,
    rmsnorm_token,
    silu_gate_span,
)

# --------------------------------------------------------------------------------------------
# Layer programs: a stretch of the forward pass (or a whole token) as one compiled call
#
# A program is a table of ops, one row each (OP_WORDS int64: kind, barrier-after flag, two
# parameters, then each array as address and shape like a job row). The calling thread and the
# team's helpers all run `run_program` over the same rows; each op splits its work by thread index,
# and a spin barrier follows the ops that the next one depends on, so within a stretch no thread
# returns to Python. Every op computes what the per-call path computes, in the same order: the
# same bits (dispatch.Program builds the tables, model.py decides the ops).

OP_WORDS = 64  # 4 words, then up to 15 arrays
OP_NORM_Q80, OP_MATMUL, OP_FFN_UP, OP_ROPE_KV, OP_ATTENTION, OP_QUANTIZE = range(1, 7)
W_F32, W_Q40, W_Q80 = range(3)  # op parameter: how a matrix's rows are stored
ADD, ADD_Q80 = 1, 2  # OP_MATMUL's second parameter: the residual add (of the q80-rounded output)
BARRIER_STRIDE = 8  # one 64-byte line per thread's barrier word


@njit(cache=True, inline="always")
def _share(n_items, me, n_threads, align):
    """Thread me's contiguous part [start, stop) of n_items, parts a multiple of align long."""
    step = (n_items + n_threads - 1) // n_threads
    step = (step + align - 1) // align * align
    start = min(n_items, me * step)
    return start, min(n_items, start + step)


ATTENTION_DEAL = 8  # tokens of a prompt _op_attention deals out to the threads at a time


@njit(cache=True)
def _quantize_blocks(x, xq, xd, xc, t0, t1, b0, b1):
    """q80 of blocks b0..b1 of tokens t0..t1."""
    nb = xd.shape[1]
    for t in range(t0, t1):
        quantize_q80_tasks(x, xq, xd, xc, t * nb + b0, t * nb + b1)


@njit(cache=True)
def _matmul(kind, w, xq, xd, xc, scale_table, xf, out, r0, r1):
    """Rows r0..r1 of out = x . w^T with w stored as `kind` (W_*); w is the uint8 view of the rows (q40 and q80
    interleaved, Matrix.for_kernels)."""
    if kind == W_F32:
        wf = numba.carray(_pointer(_address(w), np.float32), (w.shape[0], w.shape[1] // 4))
        matmul_f32_rows(wf, xf, out, r0, r1)
    elif kind == W_Q40:
        matmul_q40_rows(w, xq, xd, xc, scale_table, out, r0, r1)
    else:
        matmul_q80_rows(w, xq, xd, xc, scale_table, out, r0, r1)


@njit(cache=True)
def _op_norm_q80(op, me, n_threads):
    """Arrays x, weight, eps (1,) f64, y, xq, xd, xc, squares (n,) f64: y = rmsnorm(x), then q80
    (parameter 0: quantize). Split by tokens."""
    x, weight, y = _arg2(op, 0, np.float32), _arg1(op, 1, np.float32), _arg2(op, 3, np.float32)
    eps = _arg1(op, 2, np.float64)[0]
    n = x.shape[1]
    squares = numba.carray(_pointer(_address(_arg1(op, 7, np.float64)) + 8 * n * me, np.float64), (n,))
    t0, t1 = _share(x.shape[0], me, n_threads, 1)
    for t in range(t0, t1):
        rmsnorm_token(x[t], weight, eps, y[t], squares)
    if op[2]:
        _quantize_blocks(y, _arg2(op, 4, np.int8), _arg2(op, 5, np.float32), _arg2(op, 6, np.int32), t0, t1, 0,
                         n // BLOCK_SIZE)


@njit(cache=True)
def _op_matmul(op, me, n_threads):
    """Arrays w (rows, row bytes) u8, xq, xd, xc, scale_table, xf, out, residual: out = x . w^T
    (parameter 0: W_*), and residual += out when parameter 1 is ADD (the residual add, fused), or out
    rounded through q80 first when it is ADD_Q80 (engine.LocalExchange's q80 partials). Split by rows,
    whole q80 blocks each when rounding."""
    w, out = _arg2(op, 0, np.uint8), _arg2(op, 6, np.float32)
    r0, r1 = _share(out.shape[1], me, n_threads, BLOCK_SIZE if op[3] == ADD_Q80 else 16)  # w: q40/q80 rows padded
    _matmul(op[2], w, _arg2(op, 1, np.int8), _arg2(op, 2, np.float32), _arg2(op, 3, np.int32),
            _arg1(op, 4, np.float32), _arg2(op, 5, np.float32), out, r0, r1)
    if op[3]:
        residual = _arg2(op, 7, np.float32)
        for t in range(out.shape[0]):
            if op[3] == ADD_Q80:
                q80_roundtrip_blocks(out, t, r0 // BLOCK_SIZE, r1 // BLOCK_SIZE)
            for r in range(r0, r1):
                residual[t, r] += out[t, r]


@njit(cache=True)
def _op_ffn_up(op, me, n_threads):
    """Arrays w1, w3, xq, xd, xc, scale_table, xf, h1, h3, hq, hd, hc: h1 = silu(x . w1^T)
    * (x . w3^T), then its q80 when the weights are quantized. Split by rows, whole block pairs each."""
    w1, w3, h1, h3 = _arg2(op, 0, np.uint8), _arg2(op, 1, np.uint8), _arg2(op, 7, np.float32), _arg2(op, 8, np.float32)
    xq, xd, xc = _arg2(op, 2, np.int8), _arg2(op, 3, np.float32), _arg2(op, 4, np.int32)
    scale_table, xf = _arg1(op, 5, np.float32), _arg2(op, 6, np.float32)
    r0, r1 = _share(h1.shape[1], me, n_threads, 2 * BLOCK_SIZE)
    _matmul(op[2], w1, xq, xd, xc, scale_table, xf, h1, r0, r1)
    _matmul(op[2], w3, xq, xd, xc, scale_table, xf, h3, r0, r1)
    for t in range(h1.shape[0]):
        silu_gate_span(h1[t], h3[t], h1[t], r0, r1)
    if op[2] != W_F32:
        _quantize_blocks(h1, _arg2(op, 9, np.int8), _arg2(op, 10, np.float32), _arg2(op, 11, np.int32), 0,
                         h1.shape[0], r0 // BLOCK_SIZE, (r1 + BLOCK_SIZE - 1) // BLOCK_SIZE)


@njit(cache=True)
def _rotate(x, out, cos, sin, falcon):
    """out = x (one head) rotated, as model.Rope: llama pairs (2i, 2i+1), falcon (i, i + hd/2); float64."""
    half = x.shape[0] // 2
    for i in range(half):
        ia, ib = (i, i + half) if falcon else (2 * i, 2 * i + 1)
        a, b = np.float64(x[ia]), np.float64(x[ib])
        out[ia] = a * cos[i] - b * sin[i]
        out[ib] = a * sin[i] + b * cos[i]


@njit(cache=True)
def _op_rope_kv(op, me, n_threads):
    """Arrays q (T, H, hd), k, v (T, KVH, hd), k_cache, v_cache (slots * KVH, S, hd), cos, sin (S, hd/2) f64,
    positions, slots (T,) i8: q rotated in place, rotated k and v into token t's slot's rows of the caches
    (slot * KVH + the kv head, its position) (parameter 0: falcon). Split by heads."""
    q, k, v = _arg3(op, 0, np.float32), _arg3(op, 1, np.float32), _arg3(op, 2, np.float32)
    k_cache, v_cache = _arg3(op, 3, np.float32), _arg3(op, 4, np.float32)
    cos, sin = _arg2(op, 5, np.float64), _arg2(op, 6, np.float64)
    positions, slots = _arg1(op, 7, np.int64), _arg1(op, 8, np.int64)
    T, H, _ = q.shape
    KVH = k.shape[1]
    task0, task1 = _share(T * (H + KVH), me, n_threads, 1)
    for task in range(task0, task1):
        t, j = task // (H + KVH), task % (H + KVH)
        pos = positions[t]
        if j < H:
            _rotate(q[t, j], q[t, j], cos[pos], sin[pos], op[2])
        else:
            row = slots[t] * KVH + j - H
            _rotate(k[t, j - H], k_cache[row, pos], cos[pos], sin[pos], op[2])
            v_cache[row, pos] = v[t, j - H]


@njit(cache=True)
def _attend(op, q, z, t0, t1, h0, h1):
    """Heads h0..h1 of tokens t0..t1, each token over its own slot's cache up to its own position
    (attention_tasks), and the q80 of each head's output blocks when parameter 0."""
    hd = q.shape[2]
    k_cache, v_cache = _arg3(op, 1, np.float32), _arg3(op, 2, np.float32)
    positions, slots = _arg1(op, 7, np.int64), _arg1(op, 8, np.int64)
    KVH = op[3]
    for t in range(t0, t1):
        s0 = slots[t] * KVH
        attention_tasks(q[t:t + 1], k_cache[s0:s0 + KVH], v_cache[s0:s0 + KVH], positions[t], z[t:t + 1], h0, h1)
    if op[2]:
        zq, zd, zc = _arg2(op, 4, np.int8), _arg2(op, 5, np.float32), _arg2(op, 6, np.int32)
        per_head = hd // BLOCK_SIZE
        for t in range(t0, t1):
            _quantize_blocks(z, zq, zd, zc, t, t + 1, h0 * per_head, h1 * per_head)


@njit(cache=True)
def _op_attention(op, me, n_threads):
    """Arrays q (T, H, hd), k_cache, v_cache (slots * KVH, S, hd), z (T, H * hd), zq, zd, zc, positions,
    slots (T,) i8: attention_tasks for each token in its slot's rows of the caches, and the q80 of each head's
    output blocks when parameter 0 (head_dim a multiple of 64); parameter 1: KVH. A few tokens: split by
    (token, head). More: a later token of a prompt attends to more positions, so groups of ATTENTION_DEAL
    tokens are dealt out back and forth (0, 1, 1, 0, ...), not in halves."""
    q, z = _arg3(op, 0, np.float32), _arg2(op, 3, np.float32)
    T, H, _ = q.shape
    if T < 2 * ATTENTION_DEAL:
        task0, task1 = _share(T * H, me, n_threads, 1)
        for t in range(task0 // H, (task1 + H - 1) // H):
            h0, h1 = max(task0 - t * H, 0), min(task1 - t * H, H)
            if h1 > h0:
                _attend(op, q, z, t, t + 1, h0, h1)
        return
    for group in range((T + ATTENTION_DEAL - 1) // ATTENTION_DEAL):
        turn = group % (2 * n_threads)
        if (turn if turn < n_threads else 2 * n_threads - 1 - turn) == me:
            t0 = group * ATTENTION_DEAL
            _attend(op, q, z, t0, min(T, t0 + ATTENTION_DEAL), 0, H)


@njit(cache=True)
def _op_quantize(op, me, n_threads):
    """Arrays x, xq, xd, xc: q80 of x. Split by block pairs."""
    xd = _arg2(op, 2, np.float32)
    b0, b1 = _share(xd.shape[1], me, n_threads, 2)
    _quantize_blocks(_arg2(op, 0, np.float32), _arg2(op, 1, np.int8), xd, _arg2(op, 3, np.int32), 0, xd.shape[0],
                     b0, b1)


SPINS_BEFORE_YIELD = 1 << 14  # ~10 us of reads: longer waits are a preempted thread, not a slower one


@njit(cache=True)
def _barrier(flags, me, n_threads, phase):
    """Wait until every thread has reached barrier number `phase` (each writes only its own word)."""
    _store_release(flags, me * BARRIER_STRIDE, phase)
    for j in range(n_threads):
        spins = 0
        while _load_acquire(flags, j * BARRIER_STRIDE) < phase:
            spins += 1
            if spins > SPINS_BEFORE_YIELD:
                _yield_cpu()


@njit(cache=True)
def run_program(ops, op0, op1, state, flags, phase, me, n_threads):
    """Thread me's part of ops op0..op1 (each token's position and slot are arrays of the ops that read them;
    state is unused). `phase` is the barrier count before this run, the same on every thread (dispatch.Team
    keeps it)."""
    for i in range(op0, op1):
        op = ops[i]
        kind = op[0]
        if kind == OP_NORM_Q80:
            _op_norm_q80(op, me, n_threads)
        elif kind == OP_MATMUL:
            _op_matmul(op, me, n_threads)
        elif kind == OP_FFN_UP:
            _op_ffn_up(op, me, n_threads)
        elif kind == OP_ROPE_KV:
            _op_rope_kv(op, me, n_threads)
        elif kind == OP_ATTENTION:
            _op_attention(op, me, n_threads)
        elif kind == OP_QUANTIZE:
            _op_quantize(op, me, n_threads)
        if op[1] and n_threads > 1:
            phase += 1
            _barrier(flags, me, n_threads, phase)
