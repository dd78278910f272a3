"""IEEE half precision on raw bits, for numba kernels: the converter writes f16 values and scales,
the runtime rounds q80 scales the way they are stored (FORMAT.md §1.2). Same rounding as numpy's
astype(float16): to nearest, ties to even, overflow to inf, subnormals kept."""
from __future__ import annotations

import numba
import numpy as np

_jit = dict(nogil=True, cache=True)


@numba.njit(inline="always", **_jit)
def f16_bits_to_f32_bits(h):
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if exp == 0x1F:
        return sign | np.uint32(0x7F800000) | (mant << np.uint32(13))
    if exp == 0:
        if mant == 0:
            return sign
        e = np.int32(1)
        while (mant & np.uint32(0x400)) == 0:  # normalize a subnormal half
            mant = mant << np.uint32(1)
            e -= 1
        mant &= np.uint32(0x3FF)
        return sign | (np.uint32(e + 112) << np.uint32(23)) | (mant << np.uint32(13))
    return sign | ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))


@numba.njit(inline="always", **_jit)
def f32_bits_to_f16_bits(f):
    """Round to nearest even, as numpy's astype(float16): overflow to inf, subnormals kept."""
    f = np.uint32(f)
    sign = np.uint16((f >> np.uint32(16)) & np.uint32(0x8000))
    a = f & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf or nan
        if a > np.uint32(0x7F800000):
            return sign | np.uint16(0x7E00) | np.uint16((a >> np.uint32(13)) & np.uint32(0x3FF))
        return sign | np.uint16(0x7C00)
    if a >= np.uint32(0x47800000):  # >= 65536: inf (65504..65536 round up through the normal path)
        return sign | np.uint16(0x7C00)
    if a >= np.uint32(0x38800000):  # a normal half
        odd = (a >> np.uint32(13)) & np.uint32(1)
        a = a - np.uint32(0x38000000) + np.uint32(0xFFF) + odd  # rebias exponent 127 -> 15, round
        return sign | np.uint16(a >> np.uint32(13))
    exp = np.int64(a >> np.uint32(23))
    shift = 126 - exp  # the half subnormal is mant24 * 2^(exp-126) units of 2^-24
    if exp == 0 or shift > 24:
        return sign
    mant = np.uint32((a & np.uint32(0x7FFFFF)) | np.uint32(0x800000))
    q = mant >> np.uint32(shift)
    rem = mant & np.uint32((1 << shift) - 1)
    half = np.uint32(1 << (shift - 1))
    if rem > half or (rem == half and (q & np.uint32(1)) == 1):
        q += np.uint32(1)
    return sign | np.uint16(q)


@numba.njit(inline="always", **_jit)
def round_to_f16(x):
    """float32 -> the float32 value of its nearest f16."""
    return np.uint32(f16_bits_to_f32_bits(f32_bits_to_f16_bits(np.float32(x).view(np.uint32)))).view(np.float32)
