"""The hot loops, compiled with numba: array in, array out, no policy.

Quantized weights arrive as their stored bytes viewed as a 2-D uint8 array (rows, row_bytes),
memory-mapped and never dequantized as a whole (FORMAT.md §1.2 block layouts). A column slice
(wo, w2 under tensor parallelism, FORMAT.md §3) is a strided view of the same bytes.
Activations headed for a quantized matmul are q80: int8 values xq (T, n), float32 block scales
xd (T, n/32) already rounded through f16 as the reference stores them, and xc (T, n/4).

The inner block products are LLVM vector IR (`_block_kernel`, `_rows_lanes_kernel`): numba
promotes int8/int32 arithmetic to int64, which stops LLVM from vectorising a plain loop. The IR
is generic except the one instruction that sums 4 int8 products into an int32 lane, taken where
the target CPU has it (KERNEL_PATH): AVX512-VNNI `vpdpbusd` on x86, `sdot` on ARM boards with
dot products (Pi 5, Cortex-A55/A76); the portable path (Pi 3B+, Pi 4, other x86) computes the
same exact integers, so every path gives the same bits.

Each kernel is a serial function over a range of rows (heads, blocks): `*_rows` / `*_tasks`.
numba's parallel forms below (matvec_q40, ...) run them a task at a time with prange; native.py
compiles the serial ones ahead of time, and compute.py, the runtime's one entry point, runs
either form on its threads. Which kernel runs on which slice is decided by `tensors.py`.
"""
from __future__ import annotations

import os

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import literal_unroll, njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from dllama.f16bits import round_to_f16
from dllama.runtime.cpu import KERNEL_PATHS, is_aarch64

BLOCK = 32
Q40_BYTES = 18
Q80_BYTES = 34
ROWS_PER_TASK = 16     # rows one thread takes at a time in the matmuls
BLOCKS_PER_TASK = 64   # q80 blocks one thread quantizes at a time

_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
LANES = 16  # float32 accumulator lanes per (row, token), see "Quantized matmuls" below


def _target_features() -> set[str]:
    """The features numba compiles for: a build's (native.py sets NUMBA_CPU_FEATURES from the
    CPU's HWCAP on ARM), else LLVM's view of this CPU."""
    features = numba.config.CPU_FEATURES
    if features is None:
        try:
            features = llvm.get_host_cpu_features().flatten()
        except RuntimeError:  # LLVM cannot tell on this CPU: the portable path
            features = ""
    return {f[1:] for f in features.split(",") if f.startswith("+")}


_TARGET = _target_features()
# x86 with AVX512-VNNI: one vpdpbusd per 64 products (LLVM >= 22 spells its operands <64 x i8>)
VNNI512 = (llvm.llvm_version_info[0] >= 22 and "avx512vnni" in _TARGET
           and not os.environ.get("DLLAMA_NO_VNNI"))  # tests force the portable path (same numbers)
# aarch64 with dot products: one sdot per 16 products (DLLAMA_NO_DOTPROD: cpu.arm_target_features)
DOTPROD = is_aarch64() and "dotprod" in _TARGET and not os.environ.get("DLLAMA_NO_DOTPROD")
KERNEL_PATH = "vnni512" if VNNI512 else "sdot" if DOTPROD else "portable"


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _const(t: ir.Type, values) -> ir.Constant:
    return ir.Constant(t, values)


def _data(context, builder, arrty, arr):
    return context.make_array(arrty)(context, builder, arr).data


def _load(builder, data, offset, vt, align=1):
    return builder.load(builder.bitcast(builder.gep(data, [offset]), vt.as_pointer()), align=align)


def _quad_sums(builder, a, x, init, a_unsigned: bool):
    """init[i] + sum_k a[4i+k] * x[4i+k] (a: u8 or s8 vector, x: s8 vector) as an i32 vector."""
    n = a.type.count
    if a_unsigned and n == 64 and VNNI512:
        name = "llvm.x86.avx512.vpdpbusd.512"
        fnty = ir.FunctionType(_vec(_i32, 16), [_vec(_i32, 16), _vec(_i8, 64), _vec(_i8, 64)])
        fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)
        return builder.call(fn, [init, a, x])
    if DOTPROD:  # q40 nibbles are 0..15: as int8 they have the same value
        return _sdot_quad_sums(builder, a, x, init)
    extend = builder.zext if a_unsigned else builder.sext
    p = builder.mul(extend(a, _vec(_i32, n)), builder.sext(x, _vec(_i32, n)))
    parts = [builder.shuffle_vector(p, p, _const(_vec(_i32, n // 4), list(range(k, n, 4)))) for k in range(4)]
    return builder.add(init, builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3])))


def _sdot_quad_sums(builder, a, x, init):
    """_quad_sums by one aarch64 sdot per 16 products: lane i of sdot is init[i] + the 4 products
    4i..4i+3, the same exact integer as the generic path's."""
    n = a.type.count
    name = "llvm.aarch64.neon.sdot.v4i32.v16i8"
    fnty = ir.FunctionType(_vec(_i32, 4), [_vec(_i32, 4), _vec(_i8, 16), _vec(_i8, 16)])
    fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)

    def part(v, width, c):
        return builder.shuffle_vector(v, v, _const(_vec(_i32, width), list(range(c * width, (c + 1) * width))))

    sums = [builder.call(fn, [part(init, 4, c), part(a, 16, c), part(x, 16, c)]) for c in range(n // 16)]
    while len(sums) > 1:  # concatenate, lanes in order
        width = 2 * sums[0].type.count
        sums = [builder.shuffle_vector(sums[i], sums[i + 1], _const(_vec(_i32, width), list(range(width))))
                for i in range(0, len(sums), 2)]
    return sums[0]


def _splat_halves(builder, values):
    """[v0] * 16 (one value) or [v0] * 8 + [v1] * 8 (two): a block's scale over its 8 lanes."""
    n = 8 * len(values)
    v = ir.Constant(_vec(_f32, n), ir.Undefined)
    for i, value in enumerate(values):
        v = builder.insert_element(v, value, _const(_i32, i))
    return builder.shuffle_vector(v, v, _const(_vec(_i32, n), [i // 8 for i in range(n)]))


def _accumulate(builder, acc_data, acc_offset, quads, scale):
    """acc[acc_offset:+n] += f32(quads) * scale."""
    n = quads.type.count
    ptr = builder.bitcast(builder.gep(acc_data, [acc_offset]), _vec(_f32, n).as_pointer())
    builder.store(builder.fadd(builder.load(ptr, align=4), builder.fmul(builder.sitofp(quads, _vec(_f32, n)), scale)),
                  ptr, align=4)


def _nibbles(builder, packed16):
    # byte j holds value j (low nibble) and value j + 16 (high nibble), FORMAT.md §1.2
    lo = builder.and_(packed16, _const(_vec(_i8, 16), [15] * 16))
    hi = builder.lshr(packed16, _const(_vec(_i8, 16), [4] * 16))
    return builder.shuffle_vector(lo, hi, _const(_vec(_i32, 32), list(range(32))))


def _block_kernel(kind: str, pair: bool):
    """acc[acc_off:+8|16] += f32(quad sums of one or two blocks) * their scales.

    kind "q40": packed q40 blocks at w[w_off] and w[w_off + stride] (u8 nibbles, the -8 comes
    from init = xc, -8 * quad sums of x); "s8": int8 values (q80 blocks or pre-unpacked rows).
    """
    n = 64 if pair else 32

    def typer(typingctx, w, w_off, stride, x, x_off, xc, xc_off, s0, s1, acc, acc_off):
        sig = types.void(w, w_off, stride, x, x_off, xc, xc_off, s0, s1, acc, acc_off)

        def codegen(context, builder, sig, args):
            w, w_off, stride, x, x_off, xc, xc_off, s0, s1, acc, acc_off = args
            wd = _data(context, builder, sig.args[0], w)

            def block(offset):
                if kind == "q40":
                    return _nibbles(builder, _load(builder, wd, offset, _vec(_i8, 16)))
                return _load(builder, wd, offset, _vec(_i8, 32))

            a = block(w_off)
            if pair:
                a = builder.shuffle_vector(a, block(builder.add(w_off, stride)), _const(_vec(_i32, 64), list(range(64))))
            xv = _load(builder, _data(context, builder, sig.args[3], x), x_off, _vec(_i8, n))
            if kind == "q40":
                init = _load(builder, _data(context, builder, sig.args[5], xc), xc_off, _vec(_i32, n // 4), align=4)
            else:
                init = _const(_vec(_i32, n // 4), [0] * (n // 4))
            quads = _quad_sums(builder, a, xv, init, a_unsigned=kind == "q40")
            _accumulate(builder, _data(context, builder, sig.args[9], acc), acc_off, quads,
                        _splat_halves(builder, [s0, s1] if pair else [s0]))
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"_{kind}_{'pair' if pair else 'block'}"
    return intrinsic(typer)


_q40_pair, _q40_block = _block_kernel("q40", True), _block_kernel("q40", False)
_s8_pair, _s8_block = _block_kernel("s8", True), _block_kernel("s8", False)


@intrinsic
def _unpack_q40_block(typingctx, w, w_off, out, out_off):
    """out[out_off:+32] = the 32 nibbles (u8, value order) of the q40 block whose 16 bytes are at w[w_off]."""
    sig = types.void(w, w_off, out, out_off)

    def codegen(context, builder, sig, args):
        w, w_off, out, out_off = args
        nibbles = _nibbles(builder, _load(builder, _data(context, builder, sig.args[0], w), w_off, _vec(_i8, 16)))
        ptr = builder.gep(_data(context, builder, sig.args[2], out), [out_off])
        builder.store(nibbles, builder.bitcast(ptr, _vec(_i8, 32).as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


def _rows_lanes_kernel(n_rows: int):
    """acc[16i:+16] = the lanes of row i < n_rows (pre-unpacked nibbles) times one token.

    The batched kernel's inner loop, in IR so the lanes stay in registers and one load of the
    token's values serves n_rows rows: per block pair p, quad sums of nib[i * row_len + 64p:+64] (u8)
    with x[64p:+64] (init xc[16p:+16], the -8 correction), converted, times w_scales[i] pair
    vector ([d_w(2p)] * 8 + [d_w(2p+1)] * 8) times x_scales likewise, added: the operations of
    `_q40_pair`, in its order, so every kernel gives the same bits.
    """
    def typer(typingctx, nib, row_len, w_scales, x, xc, x_scales, n_pairs, acc):
        sig = types.void(nib, row_len, w_scales, x, xc, x_scales, n_pairs, acc)

        def codegen(context, builder, sig, args):
            nib, row_len, w_scales, x, xc, x_scales, n_pairs, acc = args
            nib_d, ws_d, x_d, xc_d, xs_d, acc_d = (_data(context, builder, sig.args[i], v) for i, v in
                                                   ((0, nib), (2, w_scales), (3, x), (4, xc), (5, x_scales), (7, acc)))
            lanes_ty = _vec(_f32, LANES)
            lanes = [cgutils.alloca_once_value(builder, _const(lanes_ty, [0.0] * LANES)) for _ in range(n_rows)]
            row_bytes = row_len
            row_scales = builder.mul(n_pairs, _const(_i64, 16))
            with cgutils.for_range(builder, n_pairs) as loop:
                p = loop.index
                v64 = builder.mul(p, _const(_i64, 64))
                v16 = builder.mul(p, _const(_i64, 16))
                xv = _load(builder, x_d, v64, _vec(_i8, 64))
                init = _load(builder, xc_d, v16, _vec(_i32, 16), align=4)
                x_scale = _load(builder, xs_d, v16, lanes_ty, align=4)
                for i in range(n_rows):
                    a = _load(builder, nib_d, builder.add(builder.mul(row_bytes, _const(_i64, i)), v64), _vec(_i8, 64))
                    w_scale = _load(builder, ws_d, builder.add(builder.mul(row_scales, _const(_i64, i)), v16), lanes_ty, align=4)
                    quads = _quad_sums(builder, a, xv, init, a_unsigned=True)
                    term = builder.fmul(builder.sitofp(quads, lanes_ty), builder.fmul(w_scale, x_scale))
                    builder.store(builder.fadd(builder.load(lanes[i]), term), lanes[i])
            for i in range(n_rows):
                ptr = builder.bitcast(builder.gep(acc_d, [_const(_i64, LANES * i)]), lanes_ty.as_pointer())
                builder.store(builder.load(lanes[i]), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"_nibble_{n_rows}rows_lanes"
    return intrinsic(typer)


ROW_GROUP = 4  # rows that share one load of a token's values in the batched q40 kernel
_nibble_group_lanes = _rows_lanes_kernel(ROW_GROUP)
_nibble_row_lanes = _rows_lanes_kernel(1)


def _packed_rows_kernel(n_rows: int):
    """acc[16i:+16] = the lanes of packed q40 row r0 + i (i < n_rows) times one token, pairs 0..n_pairs.

    The one-token kernel's inner loop in IR, so the rows' lanes stay in registers and one load of the
    token's values serves n_rows rows: per block pair p, the quad sums of the row's nibbles (blocks 2p
    and 2p+1 at bytes 36p + 2 and 36p + 20, init xc[16p:+16], the -8 correction), converted, times
    [d_w(2p) * d_x(2p)] * 8 + [d_w(2p+1) * d_x(2p+1)] * 8, added: `_q40_pair`'s operations in its order.
    """
    def typer(typingctx, w, r0, x, xc, xd, scale_table, n_pairs, acc):
        sig = types.void(w, r0, x, xc, xd, scale_table, n_pairs, acc)

        def codegen(context, builder, sig, args):
            w, r0, x, xc, xd, scale_table, n_pairs, acc = args
            w_arr = context.make_array(sig.args[0])(context, builder, w)
            row_bytes = builder.extract_value(w_arr.strides, 0)
            w_d = w_arr.data
            x_d, xc_d, xd_d, table_d, acc_d = (_data(context, builder, sig.args[i], v) for i, v in
                                               ((2, x), (3, xc), (4, xd), (5, scale_table), (7, acc)))
            lanes_ty = _vec(_f32, LANES)
            lanes = [cgutils.alloca_once_value(builder, _const(lanes_ty, [0.0] * LANES)) for _ in range(n_rows)]
            rows = [builder.mul(builder.add(r0, _const(_i64, i)), row_bytes) for i in range(n_rows)]

            def scale(offset):
                bits = _load(builder, w_d, offset, _i16)
                return builder.load(builder.gep(table_d, [builder.zext(bits, _i64)]))

            with cgutils.for_range(builder, n_pairs) as loop:
                p = loop.index
                xv = _load(builder, x_d, builder.mul(p, _const(_i64, 64)), _vec(_i8, 64))
                init = _load(builder, xc_d, builder.mul(p, _const(_i64, 16)), _vec(_i32, 16), align=4)
                b = builder.mul(p, _const(_i64, 2))
                x_scale = _splat_halves(builder, [builder.load(builder.gep(xd_d, [b])),
                                                  builder.load(builder.gep(xd_d, [builder.add(b, _const(_i64, 1))]))])
                o = builder.mul(p, _const(_i64, 2 * Q40_BYTES))
                for i in range(n_rows):
                    base = builder.add(rows[i], o)
                    lo = _nibbles(builder, _load(builder, w_d, builder.add(base, _const(_i64, 2)), _vec(_i8, 16)))
                    hi = _nibbles(builder, _load(builder, w_d, builder.add(base, _const(_i64, 20)), _vec(_i8, 16)))
                    a = builder.shuffle_vector(lo, hi, _const(_vec(_i32, 64), list(range(64))))
                    quads = _quad_sums(builder, a, xv, init, a_unsigned=True)
                    w_scale = _splat_halves(builder, [scale(base), scale(builder.add(base, _const(_i64, Q40_BYTES)))])
                    term = builder.fmul(builder.sitofp(quads, lanes_ty), builder.fmul(w_scale, x_scale))
                    builder.store(builder.fadd(builder.load(lanes[i]), term), lanes[i])
            for i in range(n_rows):
                ptr = builder.bitcast(builder.gep(acc_d, [_const(_i64, LANES * i)]), lanes_ty.as_pointer())
                builder.store(builder.load(lanes[i]), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"_packed_{n_rows}rows"
    return intrinsic(typer)


_i16 = ir.IntType(16)
# one row at a time: 2 or 4 rows sharing each load of x measured 1.5-3x slower on Zen 4 (AVX-512)
_packed_row_lanes = _packed_rows_kernel(1)


@njit(cache=True, inline="always")
def _scale(row, offset, scale_table):
    return scale_table[np.int32(row[offset]) | (np.int32(row[offset + 1]) << 8)]


_PATH_CODE = KERNEL_PATHS.index(KERNEL_PATH)


@njit  # not cached: the constant is the path of this process's compile (env and CPU)
def kernel_path_code():
    """KERNEL_PATHS.index of the path these kernels were compiled with (native.kernel_path)."""
    return _PATH_CODE


# --------------------------------------------------------------------------------------------
# Activation quantization (the reference q80 quantizer, FORMAT.md §1.2)

@njit(cache=True, inline="always")
def _q80_scale(x, t, x0):
    """The reference q80 scale of the block x[t, x0:x0+32] (FORMAT.md §1.2): d = amax / 127, and 1/d."""
    amax = np.float32(0.0)
    for j in range(BLOCK):
        amax = max(amax, abs(x[t, x0 + j]))
    d = amax / np.float32(127.0)
    return d, (np.float32(1.0) / d if d != 0 else np.float32(0.0))


@njit(cache=True)
def quantize_q80_tasks(x, xq, xd, xc, task0, task1):
    """Blocks task0..task1 (numbered t * n/32 + b) of x (T, n) float32 -> xq (T, n) int8, xd (T, n/32)
    float32 scales (f16-rounded) and xc (T, n/4) int32 = -8 * sums of 4 consecutive xq (the q40
    nibble offset, folded out)."""
    nb = x.shape[1] // BLOCK
    for task in range(task0, task1):
        t = task // nb
        b = task % nb
        x0 = b * BLOCK
        d, inv = _q80_scale(x, t, x0)
        for j in range(BLOCK):
            xq[t, x0 + j] = np.int8(np.rint(x[t, x0 + j] * inv))
        xd[t, b] = round_to_f16(d)
        for i in range(BLOCK // 4):
            k = x0 + 4 * i
            xc[t, k // 4] = -8 * (np.int32(xq[t, k]) + np.int32(xq[t, k + 1]) + np.int32(xq[t, k + 2]) + np.int32(xq[t, k + 3]))


@njit(cache=True, parallel=True)
def quantize_q80(x, xq, xd, xc):
    """All of x, a chunk of blocks per thread (quantize_q80_tasks)."""
    n_tasks = x.shape[0] * (x.shape[1] // BLOCK)
    for chunk in prange((n_tasks + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        quantize_q80_tasks(x, xq, xd, xc, chunk * BLOCKS_PER_TASK, min(n_tasks, (chunk + 1) * BLOCKS_PER_TASK))


@njit(cache=True)
def q80_roundtrip(x):
    """x (T, n) -> its q80 quantized-then-dequantized value, in place (FORMAT.md §2 partials)."""
    T, n = x.shape
    for t in range(T):
        for b in range(n // BLOCK):
            x0 = b * BLOCK
            d, inv = _q80_scale(x, t, x0)
            ds = round_to_f16(d)
            for j in range(BLOCK):
                x[t, x0 + j] = np.float32(np.rint(x[t, x0 + j] * inv)) * ds


# --------------------------------------------------------------------------------------------
# Quantized matmuls: out (T, rows) = x (T, n) . w (rows, n)^T
#
# Every kernel computes the same numbers in the same order, so a batched prompt equals the
# token-by-token result bit for bit: a block's 32 products form 8 exact integer quad sums;
# each times f32(d_w * d_x) is added into 8 float32 lanes, even blocks into lanes 0-7 and odd
# blocks into lanes 8-15, block after block; the 16 lanes are summed in order at the end.

@njit(cache=True, inline="always")
def _lane_sum(acc, offset):
    total = np.float32(0.0)
    for i in range(LANES):
        total += acc[offset + i]
    return total


@njit(cache=True)
def matvec_q40_rows(w, xq, xd, xc, scale_table, out, r0, r1):
    """One token, rows r0..r1: w (rows, nb * 18) uint8, xq (n,) int8, xd (nb,), xc (n/4,) -> out (rows,)."""
    nb = xd.shape[0]
    acc = np.empty(LANES, dtype=np.float32)
    for r in range(r0, r1):
        _packed_row_lanes(w, r, xq, xc, xd, scale_table, nb // 2, acc)
        if nb % 2:
            b = nb - 1
            o = b * Q40_BYTES
            row = w[r]
            _q40_block(row, o + 2, 0, xq, b * BLOCK, xc, b * 8, _scale(row, o, scale_table) * xd[b], np.float32(0),
                       acc, 0)
        out[r] = _lane_sum(acc, 0)


@njit(cache=True)
def _pair_scales(scales, n_pairs, out):
    """out[16p:+16] = [scales[2p]] * 8 + [scales[2p+1]] * 8: one block's scale per lane."""
    for p in range(n_pairs):
        for i in range(8):
            out[16 * p + i] = scales[2 * p]
            out[16 * p + 8 + i] = scales[2 * p + 1]


@njit(cache=True)
def token_pair_scales(xd, out):
    """out (T, nb // 2 * 16): each token's block scales xd (T, nb) in matmul_q40_rows' lane layout."""
    for t in range(xd.shape[0]):
        _pair_scales(xd[t], xd.shape[1] // 2, out[t])


@njit(cache=True)
def matmul_q40_rows(w, xq, xd, xc, x_scales, scale_table, out, r0, r1):
    """T tokens, rows r0..r1, one pass over them: rows are unpacked to nibbles (and their scales
    decoded) once, ROW_GROUP at a time, and stay in L1 while every token streams past them.
    x_scales is token_pair_scales(xd)."""
    T, nb = xd.shape
    n_pairs = nb // 2
    n = nb * BLOCK
    nibbles = np.empty(ROW_GROUP * n, dtype=np.uint8)
    scales = np.empty((ROW_GROUP, nb), dtype=np.float32)
    w_scales = np.empty(ROW_GROUP * n_pairs * LANES, dtype=np.float32)
    acc = np.empty(ROW_GROUP * LANES, dtype=np.float32)
    while r0 < r1:
        group = ROW_GROUP if r1 - r0 >= ROW_GROUP else 1
        for i in range(group):
            row = w[r0 + i]
            for b in range(nb):
                o = b * Q40_BYTES
                scales[i, b] = _scale(row, o, scale_table)
                _unpack_q40_block(row, o + 2, nibbles, i * n + b * BLOCK)
            _pair_scales(scales[i], n_pairs, w_scales[i * n_pairs * LANES:])
        for t in range(T):
            if group == ROW_GROUP:
                _nibble_group_lanes(nibbles, n, w_scales, xq[t], xc[t], x_scales[t], n_pairs, acc)
            else:
                _nibble_row_lanes(nibbles, n, w_scales, xq[t], xc[t], x_scales[t], n_pairs, acc)
            for i in range(group):
                if nb % 2:
                    b = nb - 1
                    o = b * Q40_BYTES
                    _q40_block(w[r0 + i], o + 2, 0, xq[t], b * BLOCK, xc[t], b * 8, scales[i, b] * xd[t, b],
                               np.float32(0), acc, i * LANES)
                out[t, r0 + i] = _lane_sum(acc, i * LANES)
        r0 += group


@njit(cache=True)
def matmul_q80_rows(w, xq, xd, xc, scale_table, out, r0, r1):
    """q80 weights (rows, nb * 34) x T tokens (T = 1 included), rows r0..r1."""
    T, nb = xd.shape
    scales = np.empty(nb, dtype=np.float32)
    acc = np.empty(T * LANES, dtype=np.float32)
    for r in range(r0, r1):
        row = w[r]
        for b in range(nb):
            scales[b] = _scale(row, b * Q80_BYTES, scale_table)
        acc[:] = 0.0
        for t in range(T):
            xqt = xq[t]
            for b in range(0, nb - 1, 2):
                _s8_pair(row, b * Q80_BYTES + 2, Q80_BYTES, xqt, b * BLOCK, xc, 0, scales[b] * xd[t, b],
                         scales[b + 1] * xd[t, b + 1], acc, t * LANES)
            if nb % 2:
                b = nb - 1
                _s8_block(row, b * Q80_BYTES + 2, 0, xqt, b * BLOCK, xc, 0, scales[b] * xd[t, b], np.float32(0),
                          acc, t * LANES)
        for t in range(T):
            out[t, r] = _lane_sum(acc, t * LANES)


# The numba-parallel forms: ROWS_PER_TASK rows per task, each through the serial kernel above.

@njit(cache=True, parallel=True)
def matvec_q40(w, xq, xd, xc, scale_table, out):
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        matvec_q40_rows(w, xq, xd, xc, scale_table, out, task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


@njit(cache=True, parallel=True)
def matmul_q40(w, xq, xd, xc, x_scales, scale_table, out):
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        matmul_q40_rows(w, xq, xd, xc, x_scales, scale_table, out, task * ROWS_PER_TASK,
                        min(rows, (task + 1) * ROWS_PER_TASK))


@njit(cache=True, parallel=True)
def matmul_q80(w, xq, xd, xc, scale_table, out):
    rows = w.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        matmul_q80_rows(w, xq, xd, xc, scale_table, out, task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


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

@njit(cache=True, inline="always")
def _silu_gate(a, b):
    x = np.float64(a)
    return x / (1.0 + np.exp(-x)) * b


@njit(cache=True)
def silu_gate_rows(a, b, out, t0, t1):
    """out = silu(a) * b elementwise for tokens t0..t1, in float64, rounded once to float32 (see model.py)."""
    for t in range(t0, t1):
        for i in range(a.shape[1]):
            out[t, i] = _silu_gate(a[t, i], b[t, i])


@njit(cache=True, parallel=True)
def silu_gate(a, b, out):
    for t in prange(a.shape[0]):
        silu_gate_rows(a, b, out, t, t + 1)


# fastmath lets LLVM vectorise the float64 sums; their order then varies with the vector width,
# which float64 absorbs before the float32 rounding of the result
@njit(cache=True, fastmath=True)
def attention_tasks(q, k_cache, v_cache, pos0, out, task0, task1):
    """Heads task0..task1 (numbered t * H + h) of q (T, H, hd), tokens at positions pos0..pos0+T-1;
    the caches (S, KVH, hd) already hold them.

    out (T, H * hd): per head, softmax(q.k_t / sqrt(hd)) over t <= pos, times v. Sums run in
    float64 so the float32 result does not depend on their order (see model.py).
    """
    T, H, hd = q.shape
    group = H // k_cache.shape[1]
    inv_sqrt = 1.0 / np.sqrt(hd)
    z = np.empty(hd, dtype=np.float64)
    for task in range(task0, task1):
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
        z[:] = 0.0
        for s in range(n):
            a = scores[s] / total
            for i in range(hd):
                z[i] += a * v_cache[s, kv, i]
        for i in range(hd):
            out[t, h * hd + i] = z[i]


@njit(cache=True, parallel=True)
def attention(q, k_cache, v_cache, pos0, out):
    n_tasks = q.shape[0] * q.shape[1]
    for task in prange(n_tasks):
        attention_tasks(q, k_cache, v_cache, pos0, out, task, task + 1)


# --------------------------------------------------------------------------------------------
# The thread team of the compiled kernels (compute.Team)
#
# Helper threads live in `team_helper`, compiled code that holds no GIL: it spins on a job number,
# runs the job the caller described in its row of the job table (kind, range, then each array as
# address and shape), and publishes that it finished. Python is only involved in publishing a job
# and in sleeping after a while without one; a thread that waits for the GIL or a lock sleeps, and
# waking it costs tens of microseconds, against ~100 kernel calls per token.

JOB_WORDS = 32
(NO_JOB, JOB_QUANTIZE, JOB_MATVEC_Q40, JOB_MATMUL_Q40, JOB_MATMUL_Q80, JOB_SILU, JOB_ATTENTION, JOB_MATMUL_F32,
 JOB_PROGRAM) = range(9)


@intrinsic
def _load_acquire(typingctx, arr, index):
    """arr[index] as an atomic acquire load: re-read on every call, never hoisted out of a loop."""
    sig = arr.dtype(arr, index)

    def codegen(context, builder, sig, args):
        ptr = builder.gep(_data(context, builder, sig.args[0], args[0]), [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def _store_release(typingctx, arr, index, value):
    """arr[index] = value as an atomic release store: every write before it is visible first."""
    sig = types.void(arr, index, value)

    def codegen(context, builder, sig, args):
        ptr = builder.gep(_data(context, builder, sig.args[0], args[0]), [args[1]])
        builder.store_atomic(context.cast(builder, args[2], sig.args[2], sig.args[0].dtype), ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _address(typingctx, arr):
    sig = types.int64(arr)

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(_data(context, builder, sig.args[0], args[0]), _i64)

    return sig, codegen


@intrinsic
def _pointer(typingctx, address, dtype):
    """The address as a pointer to dtype (np.uint8, np.float32, ...), for numba.carray."""
    target = dtype.instance_type
    sig = types.CPointer(target)(address, dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(target).as_pointer())

    return sig, codegen


@njit(cache=True)
def _describe(job, kind, start, stop, scalar, arrays):
    """Row `job` of the table = kind, range, scalar, then each array (in argument order) as its
    address and shape in 4 words."""
    job[0], job[1], job[2], job[3] = kind, start, stop, scalar
    base = 4
    for arr in literal_unroll(arrays):
        job[base] = _address(arr)
        for d in range(arr.ndim):
            job[base + 1 + d] = arr.shape[d]
        base += 4


@njit(cache=True)
def job_quantize(job, x, xq, xd, xc, start, stop):
    _describe(job, JOB_QUANTIZE, start, stop, 0, (x, xq, xd, xc))


@njit(cache=True)
def job_matvec_q40(job, w, xq, xd, xc, scale_table, out, start, stop):
    _describe(job, JOB_MATVEC_Q40, start, stop, 0, (w, xq, xd, xc, scale_table, out))


@njit(cache=True)
def job_matmul_q40(job, w, xq, xd, xc, x_scales, scale_table, out, start, stop):
    _describe(job, JOB_MATMUL_Q40, start, stop, 0, (w, xq, xd, xc, x_scales, scale_table, out))


@njit(cache=True)
def job_matmul_q80(job, w, xq, xd, xc, scale_table, out, start, stop):
    _describe(job, JOB_MATMUL_Q80, start, stop, 0, (w, xq, xd, xc, scale_table, out))


@njit(cache=True)
def job_silu_gate(job, a, b, out, start, stop):
    _describe(job, JOB_SILU, start, stop, 0, (a, b, out))


@njit(cache=True)
def job_attention(job, q, k_cache, v_cache, pos0, out, start, stop):
    _describe(job, JOB_ATTENTION, start, stop, pos0, (q, k_cache, v_cache, out))


@njit(cache=True)
def job_matmul_f32(job, w, x, out, start, stop):
    _describe(job, JOB_MATMUL_F32, start, stop, 0, (w, x, out))


@njit(cache=True, inline="always")
def _arg1(job, slot, dtype):
    base = 4 + 4 * slot
    return numba.carray(_pointer(job[base], dtype), (job[base + 1],))


@njit(cache=True, inline="always")
def _arg2(job, slot, dtype):
    base = 4 + 4 * slot
    return numba.carray(_pointer(job[base], dtype), (job[base + 1], job[base + 2]))


@njit(cache=True, inline="always")
def _arg3(job, slot, dtype):
    base = 4 + 4 * slot
    return numba.carray(_pointer(job[base], dtype), (job[base + 1], job[base + 2], job[base + 3]))


@njit(cache=True)
def job_program(job, ops, state, flags, op0, op1, phase, me, n_threads):
    """A helper's share of run_program (its thread index `me` of n_threads)."""
    _describe(job, JOB_PROGRAM, op0, op1, phase, (ops, state, flags))
    job[16], job[17] = me, n_threads


@njit(cache=True)
def _run_job(job):
    kind, start, stop = job[0], job[1], job[2]
    if kind == JOB_QUANTIZE:
        quantize_q80_tasks(_arg2(job, 0, np.float32), _arg2(job, 1, np.int8), _arg2(job, 2, np.float32),
                           _arg2(job, 3, np.int32), start, stop)
    elif kind == JOB_MATVEC_Q40:
        matvec_q40_rows(_arg2(job, 0, np.uint8), _arg1(job, 1, np.int8), _arg1(job, 2, np.float32),
                        _arg1(job, 3, np.int32), _arg1(job, 4, np.float32), _arg1(job, 5, np.float32), start, stop)
    elif kind == JOB_MATMUL_Q40:
        matmul_q40_rows(_arg2(job, 0, np.uint8), _arg2(job, 1, np.int8), _arg2(job, 2, np.float32),
                        _arg2(job, 3, np.int32), _arg2(job, 4, np.float32), _arg1(job, 5, np.float32),
                        _arg2(job, 6, np.float32), start, stop)
    elif kind == JOB_MATMUL_Q80:
        matmul_q80_rows(_arg2(job, 0, np.uint8), _arg2(job, 1, np.int8), _arg2(job, 2, np.float32),
                        _arg2(job, 3, np.int32), _arg1(job, 4, np.float32), _arg2(job, 5, np.float32), start, stop)
    elif kind == JOB_SILU:
        silu_gate_rows(_arg2(job, 0, np.float32), _arg2(job, 1, np.float32), _arg2(job, 2, np.float32), start, stop)
    elif kind == JOB_MATMUL_F32:
        matmul_f32_rows(_arg2(job, 0, np.float32), _arg2(job, 1, np.float32), _arg2(job, 2, np.float32), start, stop)
    elif kind == JOB_ATTENTION:
        attention_tasks(_arg3(job, 0, np.float32), _arg3(job, 1, np.float32), _arg3(job, 2, np.float32), job[3],
                        _arg2(job, 3, np.float32), start, stop)
    elif kind == JOB_PROGRAM:
        run_program(_arg2(job, 0, np.int64), start, stop, _arg1(job, 1, np.int64), _arg1(job, 2, np.int64), job[3],
                    job[16], job[17])


@njit(cache=True)
def publish(job_number, number):
    """Start job `number` (the job table is written): a release store the helpers see."""
    _store_release(job_number, 0, number)


@njit(cache=True)
def spin_until_changed(flags, index, seen, max_spins):
    """True once flags[index] != seen, False after max_spins reads."""
    for _ in range(max_spins):
        if _load_acquire(flags, index) != seen:
            return True
    return False


@njit(cache=True)
def spin_until_all_equal(flags, count, value, max_spins):
    """True once flags[:count] all equal value, False after max_spins rounds."""
    for _ in range(max_spins):
        i = 0
        while i < count and _load_acquire(flags, i) == value:
            i += 1
        if i == count:
            return True
    return False


@njit(cache=True)
def team_helper(job_number, finished, jobs, me, seen, max_spins):
    """A helper thread's loop: run each published job (row `me` of the table), then mark it finished.
    Returns the last job number seen once none came for max_spins reads (the thread then sleeps),
    or -1 when the job number is negative (stop)."""
    while True:
        if not spin_until_changed(job_number, 0, seen, max_spins):
            return seen
        seen = _load_acquire(job_number, 0)
        if seen < 0:
            return -1
        _run_job(jobs[me])
        _store_release(finished, me, seen)


# --------------------------------------------------------------------------------------------
# Layer programs: a stretch of the forward pass (or a whole token) as one compiled call
#
# A program is a table of ops, one row each (OP_WORDS int64: kind, barrier-after flag, two
# parameters, then each array as address and shape like a job row). The calling thread and the
# team's helpers all run `run_program` over the same rows; each op splits its work by thread index,
# and a spin barrier follows the ops that the next one depends on, so within a stretch no thread
# returns to Python. Every op computes what the per-call path computes, in the same order: the
# same bits (compute.Program builds the tables, model.py decides the ops).

OP_WORDS = 64  # 4 words, then up to 15 arrays
OP_NORM_Q80, OP_MATMUL, OP_FFN_UP, OP_ROPE_KV, OP_ATTENTION, OP_QUANTIZE = range(1, 7)
W_F32, W_Q40, W_Q80 = range(3)  # op parameter: how a matrix's rows are stored
BARRIER_STRIDE = 8  # one 64-byte line per thread's barrier word


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


@njit(cache=True, inline="always")
def _share(n_items, me, n_threads, align):
    """Thread me's contiguous part [start, stop) of n_items, parts a multiple of align long."""
    step = (n_items + n_threads - 1) // n_threads
    step = (step + align - 1) // align * align
    start = min(n_items, me * step)
    return start, min(n_items, start + step)


@njit(cache=True)
def _quantize_blocks(x, xq, xd, xc, x_scales, t0, t1, b0, b1):
    """q80 of blocks b0..b1 (b0, b1 even unless they end the row) of tokens t0..t1, with their pair scales
    (token_pair_scales) when there are several tokens (the batched q40 kernel reads them)."""
    T, nb = xd.shape
    for t in range(t0, t1):
        quantize_q80_tasks(x, xq, xd, xc, t * nb + b0, t * nb + b1)
        if T > 1:
            for p in range(b0 // 2, min(b1, nb - nb % 2) // 2):
                for i in range(8):
                    x_scales[t, 16 * p + i] = xd[t, 2 * p]
                    x_scales[t, 16 * p + 8 + i] = xd[t, 2 * p + 1]


@njit(cache=True)
def _matmul(kind, w, xq, xd, xc, x_scales, scale_table, xf, out, r0, r1):
    """Rows r0..r1 of out = x . w^T with w stored as `kind` (W_*); w is the uint8 view of the rows."""
    if kind == W_F32:
        wf = numba.carray(_pointer(_address(w), np.float32), (w.shape[0], w.shape[1] // 4))
        matmul_f32_rows(wf, xf, out, r0, r1)
    elif kind == W_Q40 and xq.shape[0] == 1:
        matvec_q40_rows(w, xq[0], xd[0], xc[0], scale_table, out[0], r0, r1)
    elif kind == W_Q40:
        matmul_q40_rows(w, xq, xd, xc, x_scales, scale_table, out, r0, r1)
    else:
        matmul_q80_rows(w, xq, xd, xc, scale_table, out, r0, r1)


@njit(cache=True)
def _op_norm_q80(op, me, n_threads):
    """Arrays x, weight, eps (1,) f64, y, xq, xd, xc, x_scales, squares (n,) f64: y = rmsnorm(x), then q80
    (parameter 0: quantize). Split by tokens."""
    x, weight, y = _arg2(op, 0, np.float32), _arg1(op, 1, np.float32), _arg2(op, 3, np.float32)
    eps = _arg1(op, 2, np.float64)[0]
    n = x.shape[1]
    squares = numba.carray(_pointer(_address(_arg1(op, 8, np.float64)) + 8 * n * me, np.float64), (n,))
    t0, t1 = _share(x.shape[0], me, n_threads, 1)
    for t in range(t0, t1):
        rmsnorm_token(x[t], weight, eps, y[t], squares)
    if op[2]:
        _quantize_blocks(y, _arg2(op, 4, np.int8), _arg2(op, 5, np.float32), _arg2(op, 6, np.int32),
                         _arg2(op, 7, np.float32), t0, t1, 0, n // BLOCK)


@njit(cache=True)
def _op_matmul(op, me, n_threads):
    """Arrays w (rows, row bytes) u8, xq, xd, xc, x_scales, scale_table, xf, out, residual: out = x . w^T
    (parameter 0: W_*), and residual += out when parameter 1 (the residual add, fused). Split by rows."""
    w, out = _arg2(op, 0, np.uint8), _arg2(op, 7, np.float32)
    r0, r1 = _share(w.shape[0], me, n_threads, 16)
    _matmul(op[2], w, _arg2(op, 1, np.int8), _arg2(op, 2, np.float32), _arg2(op, 3, np.int32),
            _arg2(op, 4, np.float32), _arg1(op, 5, np.float32), _arg2(op, 6, np.float32), out, r0, r1)
    if op[3]:
        residual = _arg2(op, 8, np.float32)
        for t in range(out.shape[0]):
            for r in range(r0, r1):
                residual[t, r] += out[t, r]


@njit(cache=True)
def _op_ffn_up(op, me, n_threads):
    """Arrays w1, w3, xq, xd, xc, x_scales, scale_table, xf, h1, h3, hq, hd, hc, h_scales: h1 = silu(x . w1^T)
    * (x . w3^T), then its q80 when the weights are quantized. Split by rows, whole block pairs each."""
    w1, w3, h1, h3 = _arg2(op, 0, np.uint8), _arg2(op, 1, np.uint8), _arg2(op, 8, np.float32), _arg2(op, 9, np.float32)
    xq, xd, xc = _arg2(op, 2, np.int8), _arg2(op, 3, np.float32), _arg2(op, 4, np.int32)
    x_scales, scale_table, xf = _arg2(op, 5, np.float32), _arg1(op, 6, np.float32), _arg2(op, 7, np.float32)
    r0, r1 = _share(w1.shape[0], me, n_threads, 2 * BLOCK)
    _matmul(op[2], w1, xq, xd, xc, x_scales, scale_table, xf, h1, r0, r1)
    _matmul(op[2], w3, xq, xd, xc, x_scales, scale_table, xf, h3, r0, r1)
    for t in range(h1.shape[0]):
        for r in range(r0, r1):
            h1[t, r] = _silu_gate(h1[t, r], h3[t, r])
    if op[2] != W_F32:
        _quantize_blocks(h1, _arg2(op, 10, np.int8), _arg2(op, 11, np.float32), _arg2(op, 12, np.int32),
                         _arg2(op, 13, np.float32), 0, h1.shape[0], r0 // BLOCK, (r1 + BLOCK - 1) // BLOCK)


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
def _op_rope_kv(op, pos, me, n_threads):
    """Arrays q (T, H, hd), k, v (T, KVH, hd), k_cache, v_cache (S, KVH, hd), cos, sin (S, hd/2) f64: q
    rotated in place, rotated k and v into the caches at pos.. (parameter 0: falcon). Split by heads."""
    q, k, v = _arg3(op, 0, np.float32), _arg3(op, 1, np.float32), _arg3(op, 2, np.float32)
    k_cache, v_cache = _arg3(op, 3, np.float32), _arg3(op, 4, np.float32)
    cos, sin = _arg2(op, 5, np.float64), _arg2(op, 6, np.float64)
    T, H, _ = q.shape
    KVH = k.shape[1]
    task0, task1 = _share(T * (H + KVH), me, n_threads, 1)
    for task in range(task0, task1):
        t, j = task // (H + KVH), task % (H + KVH)
        if j < H:
            _rotate(q[t, j], q[t, j], cos[pos + t], sin[pos + t], op[2])
        else:
            _rotate(k[t, j - H], k_cache[pos + t, j - H], cos[pos + t], sin[pos + t], op[2])
            v_cache[pos + t, j - H] = v[t, j - H]


@njit(cache=True)
def _op_attention(op, pos, me, n_threads):
    """Arrays q (T, H, hd), k_cache, v_cache, z (T, H * hd), zq, zd, zc, z_scales: attention_tasks, and the
    q80 of each head's output blocks when parameter 0 (head_dim a multiple of 64). Split by (token, head)."""
    q, z = _arg3(op, 0, np.float32), _arg2(op, 3, np.float32)
    T, H, hd = q.shape
    task0, task1 = _share(T * H, me, n_threads, 1)
    attention_tasks(q, _arg3(op, 1, np.float32), _arg3(op, 2, np.float32), pos, z, task0, task1)
    if op[2]:
        zq, zd, zc, z_scales = _arg2(op, 4, np.int8), _arg2(op, 5, np.float32), _arg2(op, 6, np.int32), _arg2(op, 7,
                                                                                                       np.float32)
        per_head = hd // BLOCK
        for task in range(task0, task1):
            t, h = task // H, task % H
            _quantize_blocks(z, zq, zd, zc, z_scales, t, t + 1, h * per_head, (h + 1) * per_head)


@njit(cache=True)
def _op_quantize(op, me, n_threads):
    """Arrays x, xq, xd, xc, x_scales: q80 of x (and pair scales for several tokens). Split by block pairs."""
    xd = _arg2(op, 2, np.float32)
    b0, b1 = _share(xd.shape[1], me, n_threads, 2)
    _quantize_blocks(_arg2(op, 0, np.float32), _arg2(op, 1, np.int8), xd, _arg2(op, 3, np.int32),
                     _arg2(op, 4, np.float32), 0, xd.shape[0], b0, b1)


@intrinsic
def _yield_cpu(typingctx):
    """sched_yield(): on a machine with more runnable threads than cores, a thread spinning at a barrier
    hands its core to the one it waits for instead of burning the rest of its time slice."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        fn = builder.module.globals.get("sched_yield") or ir.Function(builder.module, ir.FunctionType(_i32, []),
                                                                      "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


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
    """Thread me's part of ops op0..op1 (state[0]: the position of the first token). `phase` is the
    barrier count before this run, the same on every thread (compute.Team keeps it)."""
    pos = state[0]
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
            _op_rope_kv(op, pos, me, n_threads)
        elif kind == OP_ATTENTION:
            _op_attention(op, pos, me, n_threads)
        elif kind == OP_QUANTIZE:
            _op_quantize(op, me, n_threads)
        if op[1] and n_threads > 1:
            phase += 1
            _barrier(flags, me, n_threads, phase)
