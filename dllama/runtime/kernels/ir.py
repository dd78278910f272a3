"""LLVM IR for the kernels: the int8 block products (vpdpbusd, sdot, portable), the packed-row
lane kernels, atomics and sched_yield as numba intrinsics, and which path this CPU takes."""
from __future__ import annotations

import math
import os

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from dllama.formats import BLOCK_SIZE, Q40_BYTES, Q80_BYTES
from dllama.runtime.cpu import KERNEL_PATHS, is_aarch64

_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
LANES = 16  # float32 lanes: the f32 matmul's accumulators per (row, token), a q40/q80 group's rows


def _target_features() -> set[str]:
    """The features numba compiles for: a build's (aot_kernels.py sets NUMBA_CPU_FEATURES from the
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


def _declare(builder, name: str, ret: ir.Type, *arg_types: ir.Type) -> ir.Function:
    """The function (an LLVM intrinsic or a C symbol) `name` in the builder's module, declared once."""
    module = builder.module
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, list(arg_types)), name)


def _quad_sums(builder, a, x, init, a_unsigned: bool):
    """init[i] + sum_k a[4i+k] * x[4i+k] (a: u8 or s8 vector, x: s8 vector) as an i32 vector."""
    n = a.type.count
    if a_unsigned and n == 64 and VNNI512:
        fn = _declare(builder, "llvm.x86.avx512.vpdpbusd.512", _vec(_i32, 16), _vec(_i32, 16), _vec(_i8, 64),
                      _vec(_i8, 64))
        return builder.call(fn, [init, a, x])
    if DOTPROD:  # q40 nibbles are 0..15: as int8 they have the same value
        return _sdot_quad_sums(builder, a, x, init)
    extend = builder.zext if a_unsigned else builder.sext
    p = builder.mul(extend(a, _vec(_i32, n)), builder.sext(x, _vec(_i32, n)))
    parts = [builder.shuffle_vector(p, p, _const(_vec(_i32, n // 4), list(range(k, n, 4)))) for k in range(4)]
    return builder.add(init, builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3])))


def _sum_times(builder, values, factor: int):
    """factor * the sum of 32 int8 values, as an i32."""
    wide = builder.sext(values, _vec(_i32, 32))
    total = builder.call(_declare(builder, "llvm.vector.reduce.add.v32i32", _i32, _vec(_i32, 32)), [wide])
    return builder.mul(total, _const(_i32, factor))


def _sdot_quad_sums(builder, a, x, init):
    """_quad_sums by one aarch64 sdot per 16 products: lane i of sdot is init[i] + the 4 products
    4i..4i+3, the same exact integer as the generic path's."""
    n = a.type.count
    fn = _declare(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", _vec(_i32, 4), _vec(_i32, 4), _vec(_i8, 16),
                  _vec(_i8, 16))

    def part(v, width, c):
        return builder.shuffle_vector(v, v, _const(_vec(_i32, width), list(range(c * width, (c + 1) * width))))

    sums = [builder.call(fn, [part(init, 4, c), part(a, 16, c), part(x, 16, c)]) for c in range(n // 16)]
    while len(sums) > 1:  # concatenate, lanes in order
        width = 2 * sums[0].type.count
        sums = [builder.shuffle_vector(sums[i], sums[i + 1], _const(_vec(_i32, width), list(range(width))))
                for i in range(0, len(sums), 2)]
    return sums[0]


@intrinsic
def _quantize_q80_block(typingctx, x, x_off, xq, xc, xc_off):
    """The reference q80 quantizer on the 32 values x[x_off:] (FORMAT.md §1.2), as vectors: xq[x_off:+32] =
    rint(x * (1 / d)) and xc[xc_off] = -8 * their sum; returns d = max|x| / 127 (unrounded)."""
    sig = types.float32(x, x_off, xq, xc, xc_off)

    def codegen(context, builder, sig, args):
        x, x_off, xq, xc, xc_off = args
        vty = _vec(_f32, 32)
        values = _load(builder, _data(context, builder, sig.args[0], x), x_off, vty, align=4)
        amax = builder.call(_declare(builder, "llvm.vector.reduce.fmax.v32f32", _f32, vty),
                            [builder.call(_declare(builder, "llvm.fabs.v32f32", vty, vty), [values])])
        d = builder.fdiv(amax, ir.Constant(_f32, 127.0))
        nonzero = builder.fcmp_ordered("!=", d, ir.Constant(_f32, 0.0))
        inv = builder.select(nonzero, builder.fdiv(ir.Constant(_f32, 1.0), d), ir.Constant(_f32, 0.0))
        rounded = builder.call(_declare(builder, "llvm.rint.v32f32", vty, vty),
                               [builder.fmul(values, _splat(builder, inv, 32))])
        q = builder.fptosi(rounded, _vec(_i8, 32))
        ptr = builder.gep(_data(context, builder, sig.args[2], xq), [x_off])
        builder.store(q, builder.bitcast(ptr, _vec(_i8, 32).as_pointer()), align=1)
        builder.store(_sum_times(builder, q, -8), builder.gep(_data(context, builder, sig.args[3], xc), [xc_off]))
        return d

    return sig, codegen


# On VNNI the interleaved q80 weights are stored biased by +128 (vpdpbusd multiplies unsigned by signed)
# and the token's block sum takes the bias out again (_group_kernel).
X_BIAS = 128 if VNNI512 else 0


def _splat(builder, value, n):
    v = builder.insert_element(ir.Constant(_vec(value.type, n), ir.Undefined), value, _const(_i32, 0))
    return builder.shuffle_vector(v, v, _const(_vec(_i32, n), [0] * n))


# The group kernel asks for every cache line of the weights this many bytes ahead of the block it reads:
# decode streams every weight once per token, and the hardware prefetcher alone keeps too few lines in
# flight (they do not cross 4 KB pages). One line per block 1 KB ahead was ~5% faster than none
# (SmolLM2, paired); every line 2 KB ahead is another ~11% on the TinyLlama shape at 2 threads, where both
# cores stream (q40: 18 of 20 pairs faster, median 1.11; q80: 9 of 10, 1.12), and the same at 1 thread
# (SmolLM2 1.02, TinyLlama 1.04: within the noise). One line 4 KB ahead measured like 1 KB. A hint: it
# never faults, past the matrix's end neither.
PREFETCH_AHEAD = 2048


def _prefetch(builder, pointer):
    """llvm.prefetch: read, into every cache level, data (not instructions)."""
    fn = _declare(builder, "llvm.prefetch.p0", ir.VoidType(), pointer.type, _i32, _i32, _i32)
    builder.call(fn, [pointer, _const(_i32, 0), _const(_i32, 3), _const(_i32, 1)])


def _store_lanes(builder, acc_data, lanes, lanes_ty):
    """Each token's 16 rows' totals (kept in registers over the blocks) into acc[token * LANES:]."""
    for i, lane in enumerate(lanes):
        ptr = builder.bitcast(builder.gep(acc_data, [_const(_i64, LANES * i)]), lanes_ty.as_pointer())
        builder.store(builder.load(lane), ptr, align=4)


_i16 = ir.IntType(16)
# q40 and q80 weights in groups of 16 rows (GROUP_ROWS, math.interleave_q40 and interleave_q80): per block
# b of a group, 16 times the block's bytes (GROUP_BLOCK_BYTES): runs of 64 bytes, run k holding each row's
# stored bytes 4k..4k+3 (row i at 4i; q40: 4 runs, values 4k..4k+3 in the low nibbles and 16+4k.. in the
# high ones; q80: 8 runs of int8 values, +128 on VNNI where vpdpbusd multiplies unsigned by signed), then
# the 16 rows' f16 scales. The rows sit in the vector lanes, so a block's 8 quads of all 16 rows are 8
# vector products.
GROUP_ROWS = 16
GROUP_BLOCK_BYTES = {"q40": GROUP_ROWS * Q40_BYTES, "q80": GROUP_ROWS * Q80_BYTES}
F16C = "f16c" in _TARGET or is_aarch64()


def _group_scales(builder, w_d, offset, table_d):
    """The 16 rows' f16 scales at w[offset:] as float32 (exact): one vector conversion where the CPU has it."""
    fty = _vec(_f32, GROUP_ROWS)
    if F16C:
        return builder.fpext(_load(builder, w_d, offset, _vec(ir.HalfType(), GROUP_ROWS), align=1), fty)
    bits = _load(builder, w_d, offset, _vec(_i16, GROUP_ROWS), align=1)
    v = ir.Constant(fty, ir.Undefined)
    for i in range(GROUP_ROWS):
        index = builder.zext(builder.extract_element(bits, _const(_i32, i)), _i64)
        v = builder.insert_element(v, builder.load(builder.gep(table_d, [index])), _const(_i32, i))
    return v


def _group_kernel(kind: str, n_tokens: int):
    """acc[16j:+16] = rows 16g..16g+15 of interleaved q40 or q80 weights times token t0 + j (j < n_tokens).

    The order of sums every q40 and q80 kernel keeps: per block b, the exact integer sum of its 32
    products, converted, times f32(d_w * d_x), added into the row's one float32 total, block after block
    from 0. The integer starts from the token's correction for the block, xc (q40: -8 * its values' sum, for
    the nibbles' offset; q80 on VNNI: 16 times that, for the +128), and takes the 8 quad products on, in
    two chains of 4. Each block of the group is loaded and unpacked once for the n_tokens tokens.
    xq (T, n) int8, xc (T, nb) int32, xd (T, nb).
    """
    block_bytes = GROUP_BLOCK_BYTES[kind]
    unsigned = kind == "q40" or VNNI512
    correction_shift = 0 if kind == "q40" else 4 if VNNI512 else None

    def typer(typingctx, w, g, xq, xc, xd, t0, scale_table, acc):
        sig = types.void(w, g, xq, xc, xd, t0, scale_table, acc)

        def codegen(context, builder, sig, args):
            w, g, xq, xc, xd, t0, scale_table, acc = args
            w_arr = context.make_array(sig.args[0])(context, builder, w)
            row_bytes = builder.extract_value(w_arr.strides, 0)
            w_d = w_arr.data
            xq_arr = context.make_array(sig.args[2])(context, builder, xq)
            n = builder.extract_value(xq_arr.shape, 1)
            xq_d, xc_d, xd_d, table_d, acc_d = xq_arr.data, *(_data(context, builder, sig.args[i], v) for i, v in
                                                               ((3, xc), (4, xd), (6, scale_table), (7, acc)))
            nb = builder.udiv(n, _const(_i64, BLOCK_SIZE))
            quads_per_token = builder.udiv(n, _const(_i64, 4))
            base = builder.mul(g, builder.mul(row_bytes, _const(_i64, GROUP_ROWS)))
            tokens = [builder.add(t0, _const(_i64, j)) for j in range(n_tokens)]
            fty = _vec(_f32, GROUP_ROWS)
            totals = [cgutils.alloca_once_value(builder, _const(fty, [0.0] * GROUP_ROWS)) for _ in tokens]
            x_words = builder.bitcast(xq_d, _i32.as_pointer())
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                o = builder.add(base, builder.mul(b, _const(_i64, block_bytes)))
                for line in range(0, block_bytes, 64):
                    _prefetch(builder, builder.gep(w_d, [builder.add(o, _const(_i64, PREFETCH_AHEAD + line))]))
                runs = [_load(builder, w_d, builder.add(o, _const(_i64, 64 * k)), _vec(_i8, 64))
                        for k in range(4 if kind == "q40" else 8)]
                if kind == "q40":
                    quads = ([builder.and_(r, _const(_vec(_i8, 64), [15] * 64)) for r in runs]
                             + [builder.lshr(r, _const(_vec(_i8, 64), [4] * 64)) for r in runs])
                else:
                    quads = runs
                d_w = _group_scales(builder, w_d, builder.add(o, _const(_i64, block_bytes - 2 * GROUP_ROWS)),
                                    table_d)
                for t, total in zip(tokens, totals):
                    c = builder.add(builder.mul(t, quads_per_token), builder.mul(b, _const(_i64, 8)))
                    block = builder.add(builder.mul(t, nb), b)
                    if correction_shift is None:
                        s = _const(_vec(_i32, GROUP_ROWS), [0] * GROUP_ROWS)
                    else:
                        init = builder.load(builder.gep(xc_d, [block]))
                        s = _splat(builder, builder.shl(init, _const(_i32, correction_shift)), GROUP_ROWS)
                    # two chains of 4 products (exact integers: the same sum), half the latency of one of 8
                    chains = [s, _const(_vec(_i32, GROUP_ROWS), [0] * GROUP_ROWS)]
                    for k, q in enumerate(quads):  # quad k: values 4k..4k+3 of the block
                        x4 = builder.load(builder.gep(x_words, [builder.add(c, _const(_i64, k))]), align=1)
                        xv = builder.bitcast(_splat(builder, x4, GROUP_ROWS), _vec(_i8, 64))
                        chains[k % 2] = _quad_sums(builder, q, xv, chains[k % 2], a_unsigned=unsigned)
                    s = builder.add(*chains)
                    x_d = builder.load(builder.gep(xd_d, [block]))
                    term = builder.fmul(builder.sitofp(s, fty), builder.fmul(d_w, _splat(builder, x_d, GROUP_ROWS)))
                    builder.store(builder.fadd(builder.load(total), term), total)
            _store_lanes(builder, acc_d, totals, fty)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"_{kind}_group_{n_tokens}tokens"
    return intrinsic(typer)


GROUP_TOKENS = 4  # tokens per pass over a group's blocks: each unpacked block serves up to 4
_q40_group_1tokens, _q40_group_2tokens, _q40_group_3tokens, _q40_group_4tokens = (
    _group_kernel("q40", n) for n in range(1, GROUP_TOKENS + 1))
_q80_group_1tokens, _q80_group_2tokens, _q80_group_3tokens, _q80_group_4tokens = (
    _group_kernel("q80", n) for n in range(1, GROUP_TOKENS + 1))


# Attention over a head's rows of the KV cache: q . k and the weighted sum of v as float32 fused multiply-adds
# in 16 lanes (LLVM splits them as the target needs: 4 NEON registers), the softmax in float64, every sum in
# an order fixed here, so the bits are the same on every path and CPU. Float64 throughout, as before
# 2026-12-08, cost 4 vector conversions and twice the vectors per 16 values: the one-thread SmolLM2 decode,
# where attention is a fifth of the time at a few hundred positions, ran ~9% slower.
_f64 = ir.DoubleType()
_F64X8 = _vec(_f64, 8)


def _f64x8(builder, data, offset):
    """8 float32 values at data[offset:] as float64."""
    return builder.fpext(_load(builder, data, offset, _vec(_f32, 8), align=4), _F64X8)


def _fma(builder, a, b, c):
    """a * b + c rounded once, lane by lane, for vectors of float32 or float64."""
    t = a.type
    name = f"llvm.fma.v{t.count}{'f64' if isinstance(t.element, ir.DoubleType) else 'f32'}"
    return builder.call(_declare(builder, name, t, t, t, t), [a, b, c])


def _pick(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, _const(_vec(_i32, len(lanes)), lanes))


def _sum_four(builder, accs):
    """Each of four vectors of n lanes (n a power of two) summed as a lane tree (its halves added lane by lane
    until one lane is left), as one vector of 4: the four trees' levels computed together, each vector's partial
    sums side by side (in order) after a level."""
    vectors, width = list(accs), accs[0].type.count
    while width > 1:
        half = width // 2
        pairs = list(zip(vectors[::2], vectors[1::2])) or [(vectors[0], vectors[0])]
        lanes = vectors[0].type.count * (2 if len(vectors) > 1 else 1)  # of x then y, where they differ
        starts = range(0, lanes, width)
        low = [start + i for start in starts for i in range(half)]
        high = [start + half + i for start in starts for i in range(half)]
        vectors = [builder.fadd(_pick(builder, x, y, low), _pick(builder, x, y, high)) for x, y in pairs]
        width = half
    return vectors[0]


@intrinsic
def _head_scores(typingctx, q, kc, base, stride, n, scores):
    """scores[s] = q . kc.flat[base + s * stride:][:hd] for s < n (hd = len(q), a multiple of 8), as float64
    of a float32 sum in one order: 16 dims at a time by fused multiply-adds into 16 lanes (the last 8 dims,
    where hd % 16, into 8 lanes of their own), then each vector's lanes as a tree (`_sum_four`), the 8 lanes' sum
    added last. Four rows at a time: scores needs n rounded up to 4 values (rows past n repeat row n - 1)."""
    sig = types.void(q, kc, base, stride, n, scores)

    def codegen(context, builder, sig, args):
        q, kc, base, stride, n, scores = args
        q_d, k_d, s_d = (_data(context, builder, sig.args[i], v) for i, v in ((0, q), (1, kc), (5, scores)))
        hd = builder.extract_value(context.make_array(sig.args[0])(context, builder, q).shape, 0)
        wide = builder.udiv(hd, _const(_i64, 16))
        tail = builder.icmp_unsigned("!=", builder.urem(hd, _const(_i64, 16)), _const(_i64, 0))
        last = builder.sub(n, _const(_i64, 1))
        four = builder.udiv(builder.add(n, _const(_i64, 3)), _const(_i64, 4))
        f16x, f8x = _vec(_f32, 16), _vec(_f32, 8)
        with cgutils.for_range(builder, four) as rows:
            s0 = builder.mul(rows.index, _const(_i64, 4))
            starts = []
            for j in range(4):
                s = builder.add(s0, _const(_i64, j))
                s = builder.select(builder.icmp_signed("<", s, n), s, last)
                starts.append(builder.add(base, builder.mul(s, stride)))
            accs = [cgutils.alloca_once_value(builder, _const(f16x, [0.0] * 16)) for _ in range(4)]
            with cgutils.for_range(builder, wide) as dims:
                i = builder.mul(dims.index, _const(_i64, 16))
                qv = _load(builder, q_d, i, f16x, align=4)
                for start, acc in zip(starts, accs):
                    k = _load(builder, k_d, builder.add(start, i), f16x, align=4)
                    builder.store(_fma(builder, qv, k, builder.load(acc)), acc)
            totals = cgutils.alloca_once_value(builder, _sum_four(builder, [builder.load(a) for a in accs]))
            with builder.if_then(tail):
                i = builder.mul(wide, _const(_i64, 16))
                qv = _load(builder, q_d, i, f8x, align=4)
                parts = [_fma(builder, qv, _load(builder, k_d, builder.add(start, i), f8x, align=4),
                              _const(f8x, [0.0] * 8)) for start in starts]
                builder.store(builder.fadd(builder.load(totals), _sum_four(builder, parts)), totals)
            ptr = builder.bitcast(builder.gep(s_d, [s0]), _vec(_f64, 4).as_pointer())
            builder.store(builder.fpext(builder.load(totals), _vec(_f64, 4)), ptr, align=8)
        return context.get_dummy_value()

    return sig, codegen


def _exp(builder, x):
    """exp(x), 8 lanes: x = k ln2 + r (|r| <= ln2 / 2), e^r by its Taylor series to r^13 (truncated below
    2e-16 relative; within about one unit in the last place), times 2^k; x is first clamped to [-708, 709],
    where e^x stays a normal double."""
    def splat(value):
        return _const(_F64X8, [value] * 8)

    x = builder.select(builder.fcmp_ordered("<", x, splat(-708.0)), splat(-708.0), x)
    x = builder.select(builder.fcmp_ordered(">", x, splat(709.0)), splat(709.0), x)
    k = builder.call(_declare(builder, "llvm.rint.v8f64", _F64X8, _F64X8), [builder.fmul(x, splat(1.4426950408889634))])
    r = _fma(builder, k, splat(-6.93147180369123816490e-01), x)  # ln2 in two parts: k * the first is exact
    r = _fma(builder, k, splat(-1.90821492927058770002e-10), r)
    p = splat(1 / math.factorial(13))
    for i in range(12, -1, -1):
        p = _fma(builder, p, r, splat(1 / math.factorial(i)))
    # 2^k from k + 1023 in the low bits of a double that the magic number 2^52 keeps integral
    biased = builder.bitcast(builder.fadd(k, splat(1023.0 + 2.0 ** 52)), _vec(_i64, 8))
    two_k = builder.bitcast(builder.shl(biased, _const(_vec(_i64, 8), [52] * 8)), _F64X8)
    return builder.fmul(p, two_k)


@intrinsic
def _silu_gate8(typingctx, a, b, out, i):
    """out[i:i + 8] = float32(a / (1 + exp(-a)) * b) in float64, for float32 a, b (math.silu_gate_span's formula)."""
    sig = types.void(a, b, out, i)

    def codegen(context, builder, sig, args):
        a, b, out, i = args
        a_d, b_d, o_d = (_data(context, builder, sig.args[k], v) for k, v in ((0, a), (1, b), (2, out)))
        x = _f64x8(builder, a_d, i)
        gate = builder.fdiv(x, builder.fadd(_const(_F64X8, [1.0] * 8), _exp(builder, builder.fneg(x))))
        value = builder.fptrunc(builder.fmul(gate, _f64x8(builder, b_d, i)), _vec(_f32, 8))
        builder.store(value, builder.bitcast(builder.gep(o_d, [i]), _vec(_f32, 8).as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _softmax_scaled(typingctx, scores, n, scale):
    """scores[:n] = softmax(scores[:n] * scale) in float64, 8 at a time (scores holds n rounded up to 8 values):
    the exponentials by `_exp`, their total as 8 running sums added as `_sum_four` adds lanes."""
    sig = types.void(scores, n, scale)

    def codegen(context, builder, sig, args):
        scores, n, scale = args
        s_d = _data(context, builder, sig.args[0], scores)
        vectors = builder.udiv(builder.add(n, _const(_i64, 7)), _const(_i64, 8))
        lane_ids = _const(_vec(_i64, 8), list(range(8)))

        def each_vector(body):
            with cgutils.for_range(builder, vectors) as loop:
                i = builder.mul(loop.index, _const(_i64, 8))
                ptr = builder.bitcast(builder.gep(s_d, [i]), _F64X8.as_pointer())
                used = builder.icmp_signed("<", builder.add(_splat(builder, i, 8), lane_ids), _splat(builder, n, 8))
                body(ptr, used)

        top = cgutils.alloca_once_value(builder, _const(_F64X8, [-math.inf] * 8))
        maxnum = _declare(builder, "llvm.maxnum.v8f64", _F64X8, _F64X8, _F64X8)

        def scale_and_max(ptr, used):
            v = builder.fmul(builder.load(ptr, align=8), _splat(builder, scale, 8))
            builder.store(v, ptr, align=8)
            masked = builder.select(used, v, _const(_F64X8, [-math.inf] * 8))
            builder.store(builder.call(maxnum, [builder.load(top), masked]), top)

        each_vector(scale_and_max)
        smax = builder.call(_declare(builder, "llvm.vector.reduce.fmax.v8f64", _f64, _F64X8), [builder.load(top)])
        smax = _splat(builder, smax, 8)
        sums = cgutils.alloca_once_value(builder, _const(_F64X8, [0.0] * 8))

        def exponentiate(ptr, used):
            e = _exp(builder, builder.fsub(builder.load(ptr, align=8), smax))
            e = builder.select(used, e, _const(_F64X8, [0.0] * 8))
            builder.store(e, ptr, align=8)
            builder.store(builder.fadd(builder.load(sums), e), sums)

        each_vector(exponentiate)
        total = builder.extract_element(_sum_four(builder, [builder.load(sums)] * 4), _const(_i32, 0))
        total = _splat(builder, total, 8)
        each_vector(lambda ptr, used: builder.store(builder.fdiv(builder.load(ptr, align=8), total), ptr, align=8))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _weighted_rows(typingctx, a, vc, base, stride, n, out):
    """out[:hd] = the sum over s < n, in order, of float32(a[s]) * vc.flat[base + s * stride:][:hd] by float32
    fused multiply-adds (hd = len(out), a multiple of 8): 64 dims in registers per pass over the rows, then 16
    at a time, then 8."""
    sig = types.void(a, vc, base, stride, n, out)

    def codegen(context, builder, sig, args):
        a, vc, base, stride, n, out = args
        a_d, v_d, o_d = (_data(context, builder, sig.args[i], v) for i, v in ((0, a), (1, vc), (5, out)))
        hd = builder.extract_value(context.make_array(sig.args[5])(context, builder, out).shape, 0)

        def pass_over_rows(dim0, width, lanes):
            vty = _vec(_f32, lanes)
            accs = [cgutils.alloca_once_value(builder, _const(vty, [0.0] * lanes)) for _ in range(width)]
            with cgutils.for_range(builder, n) as rows:
                s = rows.index
                weight = _splat(builder, builder.fptrunc(builder.load(builder.gep(a_d, [s])), _f32), lanes)
                row = builder.add(builder.add(base, builder.mul(s, stride)), dim0)
                for k, acc in enumerate(accs):
                    v = _load(builder, v_d, builder.add(row, _const(_i64, lanes * k)), vty, align=4)
                    builder.store(_fma(builder, weight, v, builder.load(acc)), acc)
            for k, acc in enumerate(accs):
                ptr = builder.gep(o_d, [builder.add(dim0, _const(_i64, lanes * k))])
                builder.store(builder.load(acc), builder.bitcast(ptr, vty.as_pointer()), align=4)

        def passes(count, dim0, width, lanes):
            with cgutils.for_range(builder, count) as p:
                pass_over_rows(builder.add(dim0, builder.mul(p.index, _const(_i64, width * lanes))), width, lanes)

        wide = builder.udiv(hd, _const(_i64, 64))
        passes(wide, _const(_i64, 0), 4, 16)
        done = builder.mul(wide, _const(_i64, 64))
        sixteens = builder.udiv(builder.sub(hd, done), _const(_i64, 16))
        passes(sixteens, done, 1, 16)
        done = builder.add(done, builder.mul(sixteens, _const(_i64, 16)))
        passes(builder.udiv(builder.sub(hd, done), _const(_i64, 8)), done, 1, 8)
        return context.get_dummy_value()

    return sig, codegen


_PATH_CODE = KERNEL_PATHS.index(KERNEL_PATH)


@njit  # not cached: the constant is the path of this process's compile (env and CPU)
def kernel_path_code():
    """KERNEL_PATHS.index of the path these kernels were compiled with (aot_kernels.kernel_path)."""
    return _PATH_CODE


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


@intrinsic
def _yield_cpu(typingctx):
    """sched_yield(): on a machine with more runnable threads than cores, a thread spinning at a barrier
    hands its core to the one it waits for instead of burning the rest of its time slice."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, "sched_yield", _i32), [])
        return context.get_dummy_value()

    return sig, codegen


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
