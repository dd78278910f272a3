"""Float types and their block codecs (FORMAT.md §1.2): the one table of how values become bytes.

Every float type has one BlockFormat: how many values a block holds, its bytes, and the codec
between float32 values and those bytes. Readers, writers and kernels take their sizes from here.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dllama.errors import FormatError


class FloatType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q40 = 2
    Q80 = 3

    @classmethod
    def parse(cls, name: str) -> "FloatType":
        try:
            return cls[name.upper()]
        except KeyError:
            raise FormatError(f"unknown float type {name!r}: use one of f32, f16, q40, q80") from None


BLOCK_SIZE = 32   # values per q40 / q80 block
SCALE_BYTES = 2   # a q40 / q80 block starts with its f16 scale d

# numpy record views of one block, for kernels and readers that want the fields
Q40_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK_SIZE // 2,))])
Q80_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK_SIZE,))])


def _as_blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape and x.shape[-1] % BLOCK_SIZE:
        raise FormatError(f"row length {x.shape[-1]} is not a multiple of {BLOCK_SIZE}, "
                          "so it cannot be block-quantized")
    return x.reshape(-1, BLOCK_SIZE)


def _inverse_scales(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """Reference q40 quantizer, byte-exact with the distributed-llama converter. Returns uint8 bytes."""
    blocks = _as_blocks(x)
    mx = blocks.max(axis=1)
    mn = blocks.min(axis=1)
    # the signed value of largest magnitude; a tie |min| == max takes max
    m = np.where(-mn > mx, mn, mx).astype(np.float32)
    d = (m / np.float32(-8.0)).astype(np.float32)
    q = blocks * _inverse_scales(d)[:, None] + np.float32(8.5)
    q = np.clip(q, np.float32(0.0), np.float32(15.0)).astype(np.uint8)  # astype truncates
    out = np.empty(len(blocks), dtype=Q40_BLOCK)
    out["d"] = d.astype(np.float16)
    half = BLOCK_SIZE // 2
    out["qs"] = q[:, :half] | (q[:, half:] << 4)
    return out.view(np.uint8)


def dequantize_q40(data: np.ndarray, n: int | None = None) -> np.ndarray:
    blocks = np.frombuffer(memoryview(data), dtype=Q40_BLOCK)
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - np.float32(8.0)
    out = (q * blocks["d"].astype(np.float32)[:, None]).reshape(-1)
    return out if n is None else out[:n]


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """Reference q80 quantizer, byte-exact with the distributed-llama converter. Returns uint8 bytes."""
    blocks = _as_blocks(x)
    amax = np.abs(blocks).max(axis=1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    q = np.rint(blocks * _inverse_scales(d)[:, None])  # round half to even
    out = np.empty(len(blocks), dtype=Q80_BLOCK)
    out["d"] = d.astype(np.float16)
    out["qs"] = q.astype(np.int8)
    return out.view(np.uint8)


def dequantize_q80(data: np.ndarray, n: int | None = None) -> np.ndarray:
    blocks = np.frombuffer(memoryview(data), dtype=Q80_BLOCK)
    out = (blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)
    return out if n is None else out[:n]


def _plain(dtype: str) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """The codec of an unblocked type: values stored as little-endian `dtype`."""
    return (lambda x: x.reshape(-1).astype(dtype, copy=False).view(np.uint8),
            lambda raw: raw.view(dtype).astype(np.float32, copy=False))


@dataclass(frozen=True)
class BlockFormat:
    values: int   # values per block
    nbytes: int   # bytes per block
    encode: Callable[[np.ndarray], np.ndarray]   # float32 values (rows of whole blocks) -> uint8 bytes
    decode: Callable[[np.ndarray], np.ndarray]   # uint8 bytes -> flat float32 values


BLOCK_FORMATS = {
    FloatType.F32: BlockFormat(1, 4, *_plain("<f4")),
    FloatType.F16: BlockFormat(1, 2, *_plain("<f2")),
    FloatType.Q40: BlockFormat(BLOCK_SIZE, SCALE_BYTES + BLOCK_SIZE // 2, quantize_q40, dequantize_q40),
    FloatType.Q80: BlockFormat(BLOCK_SIZE, SCALE_BYTES + BLOCK_SIZE, quantize_q80, dequantize_q80),
}
Q40_BYTES = BLOCK_FORMATS[FloatType.Q40].nbytes
Q80_BYTES = BLOCK_FORMATS[FloatType.Q80].nbytes


def tensor_nbytes(shape: tuple[int, ...], float_type: FloatType) -> int:
    n = math.prod(int(d) for d in shape)  # Python ints: a corrupt shape cannot wrap around
    fmt = BLOCK_FORMATS[float_type]
    if n % fmt.values:
        raise FormatError(f"{n} values do not fill whole {float_type.name.lower()} blocks of {fmt.values}")
    return n // fmt.values * fmt.nbytes


def encode_tensor(x: np.ndarray, float_type: FloatType) -> np.ndarray:
    """float32 values -> the bytes of `float_type` (row-major, blocks along the last axis)."""
    return _format(float_type, "encode").encode(np.ascontiguousarray(x, dtype=np.float32))


def decode_tensor(data: np.ndarray | bytes, float_type: FloatType, shape: tuple[int, ...]) -> np.ndarray:
    """The bytes of `float_type` -> float32 values of `shape`."""
    raw = np.frombuffer(memoryview(data), dtype=np.uint8)
    return _format(float_type, "decode").decode(raw).reshape(shape)


def _format(float_type: FloatType, verb: str) -> BlockFormat:
    try:
        return BLOCK_FORMATS[float_type]
    except KeyError:
        raise FormatError(f"cannot {verb} {float_type!r}") from None
