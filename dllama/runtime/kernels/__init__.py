"""The hot loops, compiled with numba: array in, array out, no policy.

- ir.py: LLVM IR for the int8 block products and the numba intrinsics (atomics, sched_yield);
  which dot-product path this CPU takes (KERNEL_PATH).
- math.py: the kernels (q80 quantization, matmuls, silu, attention, rmsnorm).
- program.py: layer programs, a stretch of the forward pass as one call over a table of ops.
- team.py: the thread team's job table and helper loop (dispatch.Team).

Quantized weights arrive as a 2-D uint8 array (rows, row_bytes) in groups of 16 rows: the stored
blocks (FORMAT.md §1.2) reordered once at load (interleave_q40, interleave_q80, from a memory-mapped
row slice or a strided column slice, FORMAT.md §3), never dequantized as a whole.
Activations headed for a quantized matmul are q80: int8 values xq (T, n), float32 block scales
xd (T, n/32) already rounded through f16 as the reference stores them, and xc (T, n/32), -8 times
each block's sum of xq.

The inner block products are LLVM vector IR (`ir._group_kernel`): numba
promotes int8/int32 arithmetic to int64, which stops LLVM from vectorising a plain loop. The IR
is generic except the one instruction that sums 4 int8 products into an int32 lane, taken where
the target CPU has it (KERNEL_PATH): AVX512-VNNI `vpdpbusd` on x86, `sdot` on ARM boards with
dot products (Pi 5, Cortex-A55/A76); the portable path (Pi 3B+, Pi 4, other x86) computes the
same exact integers, so every path gives the same bits.

Each kernel is a serial function over a range of rows (heads, blocks): `*_rows` / `*_tasks`.
numba's parallel forms (matvec_q40, ...) run them a task at a time with prange; aot_kernels.py
compiles the serial ones ahead of time, and dispatch.py, the runtime's one entry point, runs
either form on its threads. Which kernel runs on which slice is decided by `tensors.py`.
"""

from __future__ import annotations

from dllama.runtime.kernels.ir import DOTPROD, KERNEL_PATH, VNNI512, kernel_path_code
from dllama.runtime.kernels.math import (
                                          attention,
                                          attention_tasks,
                                          interleave_q40,
                                          interleave_q80,
                                          matmul_f32,
                                          matmul_f32_rows,
                                          matmul_q40,
                                          matmul_q40_rows,
                                          matmul_q80,
                                          matmul_q80_rows,
                                          matvec_q40,
                                          matvec_q40_rows,
                                          q80_decode,
                                          q80_encode,
                                          q80_roundtrip,
                                          quantize_q80,
                                          quantize_q80_tasks,
                                          rmsnorm_token,
                                          silu_gate,
                                          silu_gate_rows,
)
from dllama.runtime.kernels.program import OP_WORDS, run_program
from dllama.runtime.kernels.team import (
                                          JOB_WORDS,
                                          NO_JOB,
                                          job_attention,
                                          job_matmul_f32,
                                          job_matmul_q40,
                                          job_matmul_q80,
                                          job_matvec_q40,
                                          job_program,
                                          job_quantize,
                                          job_silu_gate,
                                          publish,
                                          spin_until_all_equal,
                                          spin_until_changed,
                                          team_helper,
)

__all__ = [
    "DOTPROD", "JOB_WORDS", "KERNEL_PATH", "NO_JOB", "OP_WORDS", "VNNI512", "attention", "attention_tasks",
    "interleave_q40", "interleave_q80", "job_attention", "job_matmul_f32", "job_matmul_q40", "job_matmul_q80",
    "job_matvec_q40", "job_program", "job_quantize", "job_silu_gate", "kernel_path_code", "matmul_f32",
    "matmul_f32_rows", "matmul_q40", "matmul_q40_rows", "matmul_q80", "matmul_q80_rows", "matvec_q40",
    "matvec_q40_rows", "publish", "q80_decode", "q80_encode", "q80_roundtrip", "quantize_q80", "quantize_q80_tasks",
    "rmsnorm_token", "run_program", "silu_gate", "silu_gate_rows", "spin_until_all_equal", "spin_until_changed",
    "team_helper",
]
