"""The numba conversion kernels write exactly the bytes of the reference codecs in dllama.formats."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dllama.converter import encoders
from dllama.formats import permute_rotary_rows, quantize_q40, quantize_q80

ENCODERS = {
    "q40": (encoders.encode_q40, np.uint8, 18, quantize_q40),
    "q80": (encoders.encode_q80, np.uint8, 34, quantize_q80),
}


def as_source(x: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """(source bits the kernel reads, the float32 values they stand for)."""
    if kind == encoders.SRC_F32:
        return x.view(np.uint32), x
    if kind == encoders.SRC_F16:
        h = x.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float32)
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    return bf, (bf.astype(np.uint32) << 16).view(np.float32)


def run(kernel, out_dtype, out_cols, src, order):
    out = np.zeros((len(order), out_cols), out_dtype)
    kernel(src[0], src[1], order, out)
    return out


def tricky_rows(cols: int = 64) -> np.ndarray:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, cols)) * 0.02).astype(np.float32)
    x[0] = 0.0                                  # all zeros: d = 0, inverse 0
    x[1, :32] = 0.0
    x[1, 5], x[1, 9] = -3.0, 3.0                # |min| == max: q40 takes max
    x[2, :32] = np.tile([1.0, -1.0, 0.5, -0.5], 8)   # exact halves: q80 round-half-even
    x[3] = np.linspace(-1, 1, cols)
    x[4] *= 1e-6                                # tiny scales: subnormal f16 d
    x[5] *= 3e4                                 # large values near the f16 range
    x[6, :32] = -0.25                           # one-sign block
    return x


@pytest.mark.parametrize("quant", ["q40", "q80"])
@pytest.mark.parametrize("kind", [encoders.SRC_BF16, encoders.SRC_F16, encoders.SRC_F32])
def test_quantizer_kernels_match_reference_codec_bytes(quant, kind):
    kernel, out_dtype, block_bytes, reference = ENCODERS[quant]
    bits, values = as_source(tricky_rows(), kind)
    order = np.arange(len(values), dtype=np.int64)
    out = run(kernel, out_dtype, values.shape[1] // 32 * block_bytes, (bits, kind), order)
    assert np.array_equal(out.reshape(-1), reference(values))


finite_rows = arrays(np.float32, st.integers(1, 3).map(lambda n: (n, 64)),
                     elements=st.floats(-6e4, 6e4, width=32) | st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]))


@settings(max_examples=150, deadline=None)
@given(finite_rows, st.sampled_from(["q40", "q80"]))
def test_quantizer_kernels_match_reference_on_random_rows(x, quant):
    kernel, out_dtype, block_bytes, reference = ENCODERS[quant]
    order = np.arange(len(x), dtype=np.int64)
    out = run(kernel, out_dtype, x.shape[1] // 32 * block_bytes, (x.view(np.uint32), encoders.SRC_F32), order)
    expected = reference(x)
    if quant == "q40":  # an all-zero block's scale is +-0 in numpy by SIMD lane order: compare it as a value
        zero_blocks = np.flatnonzero(np.all(x.reshape(-1, 32) == 0, axis=1))
        for b in zero_blocks:
            assert out.reshape(-1)[b * 18 + 1] & 0x7F == expected[b * 18 + 1] & 0x7F == 0
            out.reshape(-1)[b * 18 + 1] = expected[b * 18 + 1]
    assert np.array_equal(out.reshape(-1), expected)


def test_all_zero_q40_block_gets_the_numpy_scale_of_positive_zeros():
    x = np.zeros((1, 32), np.float32)
    out = run(encoders.encode_q40, np.uint8, 18, (x.view(np.uint32), encoders.SRC_F32), np.arange(1))
    assert np.array_equal(out.reshape(-1), quantize_q40(x))


def test_f16_rounding_matches_numpy_on_every_boundary():
    rng = np.random.default_rng(3)
    bits = np.concatenate([
        rng.integers(0, 2**32, 500_000, dtype=np.uint64).astype(np.uint32),
        np.arange(0x33000000 - 64, 0x38800000 + 4096, 7, dtype=np.uint32),   # half subnormals
        np.arange(0x477FE000 - 4096, 0x47800000 + 4096, dtype=np.uint32),   # rounding to 65504 / inf
    ])
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    values = bits.view(np.float32)
    bits = bits[~np.isnan(values)]
    out = np.empty(len(bits), np.uint16)
    encoders.f32_bits_to_f16_bits(bits, out)
    with np.errstate(over="ignore"):
        assert np.array_equal(out, bits.view(np.float32).astype(np.float16).view(np.uint16))


def test_f16_widening_is_exact_for_every_half():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    halves = halves[~np.isnan(halves.view(np.float16))]
    out = np.empty(len(halves), np.uint32)
    encoders.f16_bits_to_f32_bits(halves, out)
    assert np.array_equal(out, halves.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("kind", [encoders.SRC_BF16, encoders.SRC_F16, encoders.SRC_F32])
def test_float_kernels_widen_exactly(kind):
    bits, values = as_source(tricky_rows()[:, :32] * np.float32(0.5), kind)
    order = np.arange(len(values), dtype=np.int64)
    f32 = run(encoders.encode_f32, np.uint32, 32, (bits, kind), order)
    assert np.array_equal(f32.view(np.float32), values)
    f16 = run(encoders.encode_f16, np.uint16, 32, (bits, kind), order)
    assert np.array_equal(f16.view(np.float16), values.astype(np.float16))


def test_row_order_gathers_the_rotary_permute():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    order = permute_rotary_rows(np.arange(16)[:, None], 2)[:, 0].astype(np.int64)
    out = run(encoders.encode_f32, np.uint32, 32, (x.view(np.uint32), encoders.SRC_F32), order)
    assert np.array_equal(out.view(np.float32), permute_rotary_rows(x, 2))
