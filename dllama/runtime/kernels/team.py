"""The thread team of the compiled kernels (dispatch.Team): the job table, publishing a job, and
the helpers' loop, in compiled code that holds no GIL."""
from __future__ import annotations

import numpy as np
from numba import literal_unroll, njit

from dllama.runtime.kernels.ir import _address, _arg1, _arg2, _arg3, _load_acquire, _store_release
from dllama.runtime.kernels.math import (
    attention_tasks,
    matmul_f32_rows,
    matmul_q40_rows,
    matmul_q80_rows,
    matvec_q40_rows,
    quantize_q80_tasks,
    silu_gate_rows,
)
from dllama.runtime.kernels.program import run_program

# --------------------------------------------------------------------------------------------
# The thread team of the compiled kernels (dispatch.Team)
#
# Helper threads live in `team_helper`, compiled code that holds no GIL: it spins on a job number,
# runs the job the caller described in its row of the job table (kind, range, then each array as
# address and shape), and publishes that it finished. Python is only involved in publishing a job
# and in sleeping after a while without one; a thread that waits for the GIL or a lock sleeps, and
# waking it costs tens of microseconds, against ~100 kernel calls per token.

JOB_WORDS = 32
(NO_JOB, JOB_QUANTIZE, JOB_MATVEC_Q40, JOB_MATMUL_Q40, JOB_MATMUL_Q80, JOB_SILU, JOB_ATTENTION, JOB_MATMUL_F32,
 JOB_PROGRAM) = range(9)


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
def job_matmul_q40(job, w, xq, xd, xc, scale_table, out, start, stop):
    _describe(job, JOB_MATMUL_Q40, start, stop, 0, (w, xq, xd, xc, scale_table, out))


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
                        _arg2(job, 3, np.int32), _arg1(job, 4, np.float32), _arg2(job, 5, np.float32), start, stop)
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
