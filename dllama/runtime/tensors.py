"""Weight matrices as stored, and the activations they multiply (FORMAT.md §1.2, §2).

A `Matrix` is a zero-copy view of a `.m` tensor (or of a node's slice of it, FORMAT.md §3):
quantized weights stay packed bytes, f32 weights a float view. Like the reference, q40 and q80
weights meet q80-quantized activations (`QuantizedInput`) and f32 weights meet f32 ones. The
runtime's q40 and q80 matrices are copied once at load into the kernels' layout (`Matrix.for_kernels`:
the same bytes per row and block, 16 rows interleaved), and their file pages leave the process.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from dllama.formats import BLOCK_FORMATS, BLOCK_SIZE, FloatType, FormatError, ModelFile
from dllama.runtime import dispatch

RUNNABLE_TYPES = (FloatType.F32, FloatType.Q40, FloatType.Q80)


@dataclass(frozen=True)
class QuantizedInput:
    """Activations (T, n) quantized to q80 once, shared by every matmul that reads them."""

    xq: np.ndarray  # (T, n) int8
    xd: np.ndarray  # (T, n/32) float32 block scales (f16-rounded)
    xc: np.ndarray  # (T, n/32) int32: -8 * each block's sum of xq (dispatch.quantize_q80)

    @classmethod
    def of(cls, x: np.ndarray) -> "QuantizedInput":
        x = np.ascontiguousarray(x, dtype=np.float32)
        T, n = x.shape
        xq = np.empty((T, n), dtype=np.int8)
        xd = np.empty((T, n // BLOCK_SIZE), dtype=np.float32)
        xc = np.empty((T, n // BLOCK_SIZE), dtype=np.int32)
        dispatch.quantize_q80(x, xq, xd, xc)
        return cls(xq, xd, xc)


@dataclass(frozen=True)
class Matrix:
    """(rows, cols) weights: `data` is (rows, row_bytes) uint8 for q40/q80, (rows, cols) float32 for f32."""

    data: np.ndarray
    float_type: FloatType
    shape: tuple[int, int]
    interleaved: bool = False  # q40/q80 rows in dispatch.interleave_q40's layout, padded to whole groups (for_kernels)

    @classmethod
    def from_file(cls, model: ModelFile, name: str) -> "Matrix":
        spec = model.layout[name].spec
        if spec.float_type not in RUNNABLE_TYPES:
            stored = spec.float_type.name.lower()
            raise FormatError(f"{model.path} stores {name} as {stored}, which the runtime (like the reference) does "
                              "not run: reconvert with dllama-convert --quant q40, q80 or f32")
        rows, cols = spec.shape
        raw = model.raw(name)
        data = raw.view("<f4").reshape(rows, cols) if spec.float_type == FloatType.F32 else raw.reshape(rows, -1)
        return cls(data, spec.float_type, (rows, cols))

    @property
    def quantized(self) -> bool:
        return self.float_type != FloatType.F32

    def for_kernels(self) -> "Matrix":
        """The matrix as the kernels take it: q40 and q80 rows interleaved (dispatch.interleave_q40) into new
        memory, INTERLEAVE_ROWS rows at a time, each chunk's file pages released once copied (release_pages), so
        a mapped tensor is not held twice; f32 as it is."""
        if not self.quantized or self.interleaved:
            return self
        rows, quant = self.shape[0], self.float_type.name.lower()
        out = np.empty((dispatch.whole_groups(rows), self.data.shape[1]), dtype=np.uint8)
        for r0 in range(0, rows, INTERLEAVE_ROWS):
            r1 = min(rows, r0 + INTERLEAVE_ROWS)
            dispatch.interleave_into(self.data[r0:r1], out[r0:r0 + dispatch.whole_groups(r1 - r0)], quant)
            release_pages(self.data[r0:r1])
        release_pages(self.data)  # and what the kernel mapped back around a released chunk as it read the next
        return Matrix(out, self.float_type, self.shape, interleaved=True)

    def row_slice(self, start: int, stop: int) -> "Matrix":
        assert not self.interleaved, "slice a matrix as stored, then make it ready for the kernels"
        return Matrix(self.data[start:stop], self.float_type, (stop - start, self.shape[1]))

    def column_slice(self, start: int, stop: int) -> "Matrix":
        """Columns [start, stop) of every row: a strided view, no copy (FORMAT.md §3 wo/w2)."""
        assert not self.interleaved, "slice a matrix as stored, then make it ready for the kernels"
        fmt = BLOCK_FORMATS[self.float_type]
        if self.quantized and (start % BLOCK_SIZE or stop % BLOCK_SIZE):
            raise FormatError(f"column slice [{start}, {stop}) does not fall on {BLOCK_SIZE}-value block boundaries")
        b0, b1 = start // fmt.values * fmt.nbytes, stop // fmt.values * fmt.nbytes
        data = self.data[:, start:stop] if not self.quantized else self.data[:, b0:b1]
        return Matrix(data, self.float_type, (self.shape[0], stop - start))

    def prepare(self, x: np.ndarray) -> "np.ndarray | QuantizedInput":
        """The activation form this matrix multiplies: q80 for quantized weights, else float32."""
        return QuantizedInput.of(x) if self.quantized else np.ascontiguousarray(x, dtype=np.float32)

    def __matmul__(self, x: "np.ndarray | QuantizedInput") -> np.ndarray:
        """(T, cols) activations -> (T, rows) float32."""
        if not self.quantized:
            x = np.ascontiguousarray(x, dtype=np.float32)
            out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
            dispatch.matmul_f32(self.data, x, out)  # not numpy's BLAS: the same bits on every CPU
            return out
        if not isinstance(x, QuantizedInput):
            x = QuantizedInput.of(x)
        T = x.xq.shape[0]
        out = np.empty((T, self.shape[0]), dtype=np.float32)
        w = self.for_kernels().data  # a copy per call unless the matrix was made ready once (assemble_node_weights)
        if self.float_type == FloatType.Q40 and T == 1:
            dispatch.matvec_q40(w, x.xq[0], x.xd[0], x.xc[0], out[0])
        elif self.float_type == FloatType.Q40:
            dispatch.matmul_q40(w, x.xq, x.xd, x.xc, out)
        else:
            dispatch.matmul_q80(w, x.xq, x.xd, x.xc, out)
        return out


INTERLEAVE_ROWS = 1024  # rows Matrix.for_kernels copies before releasing their file pages (whole groups)


def release_pages(a: np.ndarray) -> None:
    """Drop the pages of a read-only file mapping that hold a's bytes from this process (MADV_DONTNEED; the
    page cache keeps them): nothing for an array not backed by a mapping. Neighbours sharing an edge page
    fault it back in if they read it."""
    owner = a
    while owner is not None and not isinstance(owner, mmap.mmap):
        owner = getattr(owner, "base", None) if not isinstance(owner, memoryview) else owner.obj
    if owner is None or owner.closed or a.size == 0:
        return
    start = a.__array_interface__["data"][0] - np.frombuffer(owner, dtype=np.uint8).__array_interface__["data"][0]
    stop = start + sum((n - 1) * stride for n, stride in zip(a.shape, a.strides)) + a.itemsize
    page = start - start % mmap.PAGESIZE
    try:
        owner.madvise(mmap.MADV_DONTNEED, page, min(len(owner), stop) - page)
    except (OSError, ValueError):  # advice only
        pass
