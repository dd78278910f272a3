"""Which compiled kernels run, on how many threads: the one door from the runtime to the kernels package.

    dispatch.set_threads(2)                                   # for calls from this thread
    dispatch.matvec_q40(w, xq, xd, xc, out)

Two implementations of the same kernels, giving the same bits:
- "compiled" (the default where it can be built): the module aot_kernels.py builds once per machine.
  No numba or LLVM in the process; work is split into contiguous row (or head) ranges, one per
  thread, run by a `Team` of helper threads (the kernels release the GIL).
- "jit": numba's parallel kernels, imported on first use (and with them numba and LLVM).
DLLAMA_KERNELS=compiled|jit|auto (default auto: compiled if it builds, else jit) chooses.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from dllama.errors import DllamaError
from dllama.formats import BLOCK_SIZE
from dllama.runtime.cpu import KERNEL_PATHS

# f16 bits -> float32, so kernels decode block scales with one lookup (numba has no CPU half);
# aarch64's numpy warns about the NaN patterns in the cast (x86's does not): they stay NaN
with np.errstate(invalid="ignore"):
    F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
GROUP_ROWS = 16         # kernels.GROUP_ROWS: q40/q80 rows interleaved together (interleave_q40)
ROW_ALIGN = 16          # thread ranges of rows start on multiples of this (the JIT kernels' task size)
MIN_WORK = 1 << 17      # multiply-adds below which a call stays on one thread (a hand-off costs ~30 us)


class KernelsUnavailable(DllamaError, ValueError):
    """DLLAMA_KERNELS asks for something this machine cannot give."""


_CORES = os.cpu_count() or 1  # once: it reads /sys on every call, and every forward checks its threads


def max_threads() -> int:
    """This machine's cores (NUMBA_NUM_THREADS caps it, for either implementation)."""
    return int(os.environ.get("NUMBA_NUM_THREADS") or _CORES)


_local = threading.local()


def threads_problem(n: int | None) -> str | None:
    """Why `n` threads (None: all cores) cannot run here, or None."""
    if n is not None and not 1 <= n <= max_threads():
        return f"nthreads {n} is outside 1..{max_threads()} (this machine's cores)"
    return None


def set_threads(n: int) -> None:
    """Threads for kernel calls made from the calling thread (like numba.set_num_threads)."""
    if getattr(_local, "threads", None) == n:  # every forward asks: the usual answer costs no more
        return
    if problem := threads_problem(n):
        raise ValueError(problem)
    _local.threads = n
    if _backend().name == "jit":
        import numba
        numba.set_num_threads(n)


def threads() -> int:
    n = getattr(_local, "threads", None)
    return max_threads() if n is None else n


# --------------------------------------------------------------------------------------------
# The kernels (argument shapes as in the kernels package)

def quantize_q80(x, xq, xd, xc) -> None:
    _backend().quantize_q80(x, xq, xd, xc)


def q80_roundtrip(x) -> None:
    _backend().q80_roundtrip(x)


def q80_encode(x, wire) -> None:
    _backend().q80_encode(x, wire)


def q80_decode(wire, out) -> None:
    _backend().q80_decode(wire, out)


def interleave_q40(w: np.ndarray) -> np.ndarray:
    """q40 rows as the .m stores them (rows, row bytes) -> the q40 kernels' layout (kernels.interleave_q40), a
    new (rows rounded up to GROUP_ROWS, row bytes) array: the kernels take the row count from their output."""
    return _interleaved(w, "q40")


def interleave_q80(w: np.ndarray) -> np.ndarray:
    """q80 rows as stored -> the q80 kernels' layout (kernels.interleave_q80), as interleave_q40."""
    return _interleaved(w, "q80")


def _interleaved(w: np.ndarray, quant: str) -> np.ndarray:
    out = np.empty((whole_groups(w.shape[0]), w.shape[1]), dtype=np.uint8)
    interleave_into(w, out, quant)
    return out


def whole_groups(rows: int) -> int:
    """rows rounded up to whole groups of GROUP_ROWS: the rows an interleaved array holds."""
    return -(-rows // GROUP_ROWS) * GROUP_ROWS


def interleave_into(w: np.ndarray, out: np.ndarray, quant: str) -> None:
    """interleave_q40 ("q40") or interleave_q80 ("q80") into out, (rows rounded up to GROUP_ROWS, row bytes)
    C-contiguous."""
    getattr(_backend(), "interleave_" + quant)(w, out)


def matvec_q40(w, xq, xd, xc, out) -> None:
    """w: interleave_q40's layout, as for matmul_q40."""
    _backend().matvec_q40(w, xq, xd, xc, out)


def matmul_q40(w, xq, xd, xc, out) -> None:
    _backend().matmul_q40(w, xq, xd, xc, out)


def matmul_q80(w, xq, xd, xc, out) -> None:
    _backend().matmul_q80(w, xq, xd, xc, out)


def matmul_f32(w, x, out) -> None:
    """out (T, rows) = x (T, n) . w (rows, n)^T in float32, the same bits on every CPU (not BLAS)."""
    _backend().matmul_f32(w, x, out)


def silu_gate(a, b, out) -> None:
    _backend().silu_gate(a, b, out)


def attention(q, k_cache, v_cache, pos0: int, out) -> None:
    _backend().attention(q, k_cache, v_cache, pos0, out)


def runs_programs() -> bool:
    """Whether `Program.run` is available: the compiled kernels (the JIT runs the per-call path)."""
    return _backend().name == "compiled"


# --------------------------------------------------------------------------------------------
# Programs: stretches of the forward pass as one compiled call (kernels/program.py)

OP_WORDS = 64  # kernels.OP_WORDS and the op numbers below (this module does not import numba's kernels)
OP_NORM_Q80, OP_MATMUL, OP_FFN_UP, OP_ROPE_KV, OP_ATTENTION, OP_QUANTIZE = range(1, 7)
W_F32, W_Q40, W_Q80 = range(3)
ADD, ADD_Q80 = 1, 2  # OP_MATMUL's residual add: of its output, of its output rounded through q80
BARRIER_STRIDE = 8


class Program:
    """A table of ops for kernels.run_program. `add` appends one (its arrays: C-contiguous, or None
    for a slot the op does not read) and keeps the arrays alive as long as the table names them;
    `mark(name)` closes a stretch that `run(name, pos)` runs as one call on this thread's threads."""

    def __init__(self):
        self._rows: list = []  # lists of OP_WORDS ints, then views of the table
        self._arrays: dict[int, tuple[np.ndarray, int]] = {}  # id -> the array (held: its id stays its own), address
        self._stretches: dict[str, tuple[int, int, int]] = {}  # name -> first op, end op, barriers
        self._start = 0
        self.ops: np.ndarray | None = None
        self.state = np.zeros(1, dtype=np.int64)  # the position of the batch's first token

    def add(self, kind: int, arrays, params=(0, 0), barrier: bool = True) -> int:
        """Append an op; its index (for `point`)."""
        row = [kind, int(barrier), *params] + [0] * (OP_WORDS - 4)  # a list: the table is made once, on the next run
        for slot, a in enumerate(arrays):
            if a is not None:
                if id(a) not in self._arrays:
                    self._arrays[id(a)] = a, _address(a, kind, slot)
                _describe_array(row, slot, a, self._arrays[id(a)][1])
        self._rows.append(row)
        return len(self._rows) - 1

    def point(self, op: int, slot: int, a: np.ndarray) -> None:
        """Op `op` reads or writes `a` in `slot` from the next run on (the caller keeps `a` alive meanwhile)."""
        self._table()
        _describe_array(self.ops[op], slot, a, _address(a, self.ops[op][0], slot))

    def mark(self, name: str) -> None:
        end = len(self._rows)
        self._stretches[name] = (self._start, end, sum(int(row[1]) for row in self._rows[self._start:end]))
        self._start = end
        self.ops = None  # the table is built on the next run

    def seal(self) -> None:
        """Make the table now rather than on the first run (after the last `mark`)."""
        self._table()

    def run(self, name: str, pos: int) -> None:
        op0, op1, n_barriers = self._stretches[name]
        self.state[0] = pos
        _backend().run_program(self._table(), op0, op1, self.state, n_barriers)

    def _table(self) -> np.ndarray:
        if self.ops is None:
            self.ops = np.array(self._rows, dtype=np.int64).reshape(-1, OP_WORDS)
            self._rows = list(self.ops)  # rows are views of the table: `point` changes both
        return self.ops


def _address(a: np.ndarray, kind: int, slot: int) -> int:
    if not a.flags.c_contiguous:
        raise ValueError(f"op {kind} slot {slot}: the programs take C-contiguous arrays")
    return a.ctypes.data


def _describe_array(row, slot: int, a: np.ndarray, address: int) -> None:
    base = 4 + 4 * slot
    row[base:base + 4] = (address, *a.shape, *(0,) * (3 - a.ndim))


# --------------------------------------------------------------------------------------------
# The implementations

class JitKernels:
    name = "jit"

    def __init__(self):
        from dllama.runtime import kernels
        self.k = kernels
        self.path = kernels.KERNEL_PATH

    def quantize_q80(self, x, xq, xd, xc):
        self.k.quantize_q80(x, xq, xd, xc)

    def q80_roundtrip(self, x):
        self.k.q80_roundtrip(x)

    def q80_encode(self, x, wire):
        self.k.q80_encode(x, wire)

    def q80_decode(self, wire, out):
        self.k.q80_decode(wire, out)

    def interleave_q40(self, w, out):
        self.k.interleave_q40(w, out)

    def interleave_q80(self, w, out):
        self.k.interleave_q80(w, out)

    def matvec_q40(self, w, xq, xd, xc, out):
        self.k.matvec_q40(w, xq, xd, xc, F16_TO_F32, out)

    def matmul_q40(self, w, xq, xd, xc, out):
        self.k.matmul_q40(w, xq, xd, xc, F16_TO_F32, out)

    def matmul_q80(self, w, xq, xd, xc, out):
        self.k.matmul_q80(w, xq, xd, xc, F16_TO_F32, out)

    def matmul_f32(self, w, x, out):
        self.k.matmul_f32(w, x, out)

    def silu_gate(self, a, b, out):
        self.k.silu_gate(a, b, out)

    def attention(self, q, k_cache, v_cache, pos0, out):
        self.k.attention(q, k_cache, v_cache, pos0, out)


class CompiledKernels:
    name = "compiled"

    def __init__(self, module):
        self.m = module
        self._team: Team | None = None
        self.path = KERNEL_PATHS[module.kernel_path_code()]

    def quantize_q80(self, x, xq, xd, xc):
        n_blocks = x.shape[0] * (x.shape[1] // BLOCK_SIZE)
        self._split("quantize_q80_tasks", "job_quantize", (x, xq, xd, xc), n_blocks, work_per_item=4 * BLOCK_SIZE,
                    align=1)

    def q80_roundtrip(self, x):
        self.m.q80_roundtrip(x)

    def q80_encode(self, x, wire):
        self.m.q80_encode(x, wire)

    def q80_decode(self, wire, out):
        self.m.q80_decode(wire, out)

    def interleave_q40(self, w, out):
        self.m.interleave_q40(w, out)

    def interleave_q80(self, w, out):
        self.m.interleave_q80(w, out)

    def matvec_q40(self, w, xq, xd, xc, out):
        self._split("matvec_q40_rows", "job_matvec_q40", (_rows(w), xq, xd, xc, F16_TO_F32, out), out.shape[0],
                    work_per_item=xq.shape[0])

    def matmul_q40(self, w, xq, xd, xc, out):
        args = (_rows(w), xq, xd, xc, F16_TO_F32, out)
        self._split("matmul_q40_rows", "job_matmul_q40", args, out.shape[1], work_per_item=xq.size)

    def matmul_q80(self, w, xq, xd, xc, out):
        args = (_rows(w), xq, xd, xc, F16_TO_F32, out)
        self._split("matmul_q80_rows", "job_matmul_q80", args, out.shape[1], work_per_item=xq.size)

    def matmul_f32(self, w, x, out):
        self._split("matmul_f32_rows", "job_matmul_f32", (_rows(w), x, out), w.shape[0], work_per_item=x.size)

    def silu_gate(self, a, b, out):
        self._split("silu_gate_rows", "job_silu_gate", (a, b, out), a.shape[0], work_per_item=8 * a.shape[1], align=1)

    def attention(self, q, k_cache, v_cache, pos0, out):
        T, H, hd = q.shape
        self._split("attention_tasks", "job_attention", (q, k_cache, v_cache, pos0, out), T * H,
                    work_per_item=2 * hd * (pos0 + T), align=1)

    def run_program(self, ops, op0: int, op1: int, state, n_barriers: int) -> None:
        n_threads = threads()
        if n_threads == 1:
            self.m.run_program(ops, op0, op1, state, _SOLO_FLAGS, 0, 0, 1)
            return
        self._ensure_team(n_threads - 1)
        self._team.run_program(ops, op0, op1, state, n_threads, n_barriers)

    def _ensure_team(self, n_helpers: int) -> None:
        if self._team is None or self._team.n_helpers < n_helpers:  # as many helpers as asked for, no more
            if self._team is not None:
                self._team.stop()
            self._team = Team(self.m, n_helpers)

    def _split(self, kernel: str, job: str, args, n_items: int, work_per_item: int, align: int = ROW_ALIGN) -> None:
        """kernel(*args, start, stop) over [0, n_items), in one contiguous range per thread."""
        n_threads = min(threads(), max(1, n_items * work_per_item // MIN_WORK), max(1, n_items // align))
        if n_threads == 1:
            getattr(self.m, kernel)(*args, 0, n_items)
            return
        step = -(-n_items // n_threads // align) * align if align > 1 else -(-n_items // n_threads)
        ranges = [(start, min(n_items, start + step)) for start in range(0, n_items, step)]
        self._ensure_team(len(ranges) - 1)
        self._team.run(getattr(self.m, kernel), getattr(self.m, job), args, ranges)


JOB_WORDS = 32  # kernels.JOB_WORDS (this module does not import numba's kernels)
_SOLO_FLAGS = np.zeros(BARRIER_STRIDE, dtype=np.int64)  # a one-thread program passes no barrier


class Team:
    """Helper threads for the compiled kernels. They live in compiled code without the GIL
    (kernels.team_helper): like OpenMP's threads they spin a while on a job number, run the job
    described in their row of a job table, and only sleep after ~0.3 ms without one. A thread that
    sleeps (on a lock, or waiting for the GIL) costs tens of microseconds to wake, and a token
    makes ~100 kernel calls."""

    SPINS = 1 << 20  # reads of the job number, ~0.3 ms on x86

    def __init__(self, module, n_helpers: int):
        self.m = module
        self.n_helpers = n_helpers
        self.job_number = np.zeros(1, dtype=np.int64)
        self.finished = np.zeros(n_helpers, dtype=np.int64)  # the job number each helper last finished
        self.jobs = np.zeros((n_helpers, JOB_WORDS), dtype=np.int64)
        # kernels/program.py _barrier's words, one cache line per thread
        self.barriers = np.zeros((n_helpers + 1) * BARRIER_STRIDE, dtype=np.int64)
        self.phase = 0  # barriers passed so far, by every thread of every program run
        self.number = 0
        self.wake = threading.Condition()
        self.busy = threading.Lock()
        self.threads = [threading.Thread(target=self._helper, args=(i,), name=f"dllama-kernel-{i + 1}", daemon=True)
                        for i in range(n_helpers)]
        for t in self.threads:
            t.start()

    def run(self, kernel, describe, args, ranges: list[tuple[int, int]]) -> None:
        """kernel(*args, *r) for every range r: the first on the calling thread, the others on helpers
        (describe(job_row, *args, *r) writes the job)."""
        if not self.busy.acquire(blocking=False):
            for r in ranges:  # another thread is using the team: run them all here
                kernel(*args, *r)
            return
        try:
            def describe_helper(i: int) -> None:
                describe(self.jobs[i], *args, *ranges[i + 1])

            self._run_with_helpers(len(ranges) - 1, describe_helper, lambda: kernel(*args, *ranges[0]))
        finally:
            self.busy.release()

    def run_program(self, ops, op0: int, op1: int, state, n_threads: int, n_barriers: int) -> None:
        """kernels.run_program over ops op0..op1 on the calling thread (thread 0) and n_threads - 1 helpers."""
        if not self.busy.acquire(blocking=False):  # another thread is using the team: all of it here
            self.m.run_program(ops, op0, op1, state, _SOLO_FLAGS, 0, 0, 1)
            return
        try:
            def describe_helper(i: int) -> None:
                self.m.job_program(self.jobs[i], ops, state, self.barriers, op0, op1, self.phase, i + 1, n_threads)

            self._run_with_helpers(n_threads - 1, describe_helper,
                                   lambda: self.m.run_program(ops, op0, op1, state, self.barriers, self.phase, 0,
                                                              n_threads))
            self.phase += n_barriers
        finally:
            self.busy.release()

    def _run_with_helpers(self, n_jobs: int, describe_helper, run_here) -> None:
        """Describe jobs for the first n_jobs helpers (the others get none), wake them, run this
        thread's part, and wait until every helper has finished."""
        for i in range(self.n_helpers):
            if i < n_jobs:
                describe_helper(i)
            else:
                self.jobs[i, 0] = 0  # kernels.NO_JOB
        self.number += 1
        self.m.publish(self.job_number, self.number)
        with self.wake:
            self.wake.notify_all()
        run_here()
        while not self.m.spin_until_all_equal(self.finished, self.n_helpers, self.number, self.SPINS):
            pass

    def stop(self) -> None:
        """End the helper threads (after any job in progress)."""
        with self.busy:
            self.m.publish(self.job_number, -1)
            with self.wake:
                self.wake.notify_all()

    def _helper(self, i: int) -> None:
        seen = 0
        while True:
            seen = self.m.team_helper(self.job_number, self.finished, self.jobs, i, seen, self.SPINS)
            if seen < 0:
                return
            with self.wake:
                while int(self.job_number[0]) == seen:
                    self.wake.wait()


def _rows(w: np.ndarray) -> np.ndarray:
    """The compiled matmuls take C-contiguous weights. The runtime's slices are (row slices of the
    file, column slices copied by the distributed root); a strided column view is copied per call."""
    return w if w.flags.c_contiguous else np.ascontiguousarray(w)


_chosen: list = []
_choosing = threading.Lock()


def _backend():
    if _chosen:
        return _chosen[0]
    with _choosing:
        if not _chosen:
            _chosen.append(_choose(os.environ.get("DLLAMA_KERNELS", "auto")))
    return _chosen[0]


def _choose(wanted: str):
    if wanted not in ("auto", "compiled", "jit"):
        raise KernelsUnavailable(f"DLLAMA_KERNELS={wanted} is not one of auto, compiled, jit")
    if wanted == "jit":
        return JitKernels()
    from dllama.runtime import aot_kernels
    module = aot_kernels.load()
    if module is not None:
        return CompiledKernels(module)
    if wanted == "compiled":
        raise KernelsUnavailable("DLLAMA_KERNELS=compiled but the compiled kernels cannot be built on this machine "
                                 "(see the message above); unset it to use numba's JIT kernels")
    return JitKernels()


def implementation() -> str:
    """"compiled" or "jit": which kernels this process runs (choosing them if not done yet)."""
    return _backend().name


def kernel_path() -> str:
    """The int8 dot products those kernels use: "portable", "vnni512" or "sdot" (cpu.KERNEL_PATHS)."""
    return _backend().path
