"""What a node offers (`--weights auto`): its memory and a short speed probe of the q40 kernel.

Both are relative measures for the split (split.py), not benchmarks: ~0.1 s of the same matvec
every layer runs, on the thread count the node computes with.
"""
from __future__ import annotations

import os
import time

import numpy as np

from dllama.formats import BLOCK_SIZE, Q40_BLOCK, FloatType
from dllama.runtime import dispatch
from dllama.runtime.distributed.protocol import NodeInfo
from dllama.runtime.tensors import Matrix, QuantizedInput

PROBE_ROWS, PROBE_COLS = 512, 2048
PROBE_SECONDS = 0.1


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def available_memory() -> int:
    """MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return physical_memory()


def q40_speed(nthreads: int | None = None) -> float:
    """Weights per second through dispatch.matvec_q40 on a random q40 matrix."""
    if nthreads:
        dispatch.set_threads(nthreads)
    rng = np.random.default_rng(0)
    blocks = np.zeros(PROBE_ROWS * PROBE_COLS // BLOCK_SIZE, dtype=Q40_BLOCK)
    blocks["qs"] = rng.integers(0, 256, size=blocks["qs"].shape, dtype=np.uint8)
    blocks["d"] = np.float16(0.01)
    w = Matrix(blocks.view(np.uint8).reshape(PROBE_ROWS, -1), FloatType.Q40, (PROBE_ROWS, PROBE_COLS)).for_kernels()
    x = QuantizedInput.of(rng.standard_normal((1, PROBE_COLS), dtype=np.float32))
    w @ x  # warm up
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < PROBE_SECONDS:
        w @ x
        runs += 1
    return runs * PROBE_ROWS * PROBE_COLS / elapsed


def node_info(nthreads: int | None = None) -> NodeInfo:
    return NodeInfo(physical_memory(), available_memory(), q40_speed(nthreads))


def auto_weights(infos: list[NodeInfo], root_computes: bool) -> tuple[float, ...]:
    """A share per node bounded by both its speed and its free memory: min(speed share, memory share)."""
    speed = sum(i.speed for i in infos)
    memory = sum(i.available for i in infos)
    weights = [min(i.speed / speed, i.available / memory) for i in infos]
    if not root_computes:
        weights[0] = 0.0
    return tuple(weights)
