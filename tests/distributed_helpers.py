"""Helpers shared by the distributed tests: loopback workers and small models with many kv heads."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dllama.converter import synthetic
from dllama.formats import ArchType, FloatType, ModelHeader
from dllama.runtime.distributed.worker import Worker


def write_random_model(path: Path, float_type: FloatType, n_kv_heads: int = 4, seed: int = 0, moe: bool = False) -> Path:
    """A llama-shaped .m with 4 kv heads (the fixtures have 2), so 4 nodes can split it; or a
    qwen3_moe-shaped one (4 experts, 2 active, q/k norms)."""
    header = ModelHeader(arch=ArchType.QWEN3_MOE if moe else ArchType.LLAMA, dim=128, hidden_dim=256, n_layers=2,
                         n_heads=8, n_kv_heads=n_kv_heads, vocab_size=256, max_seq_len=128,
                         weights_float_type=float_type, rope_theta=10000, norm_epsilon_code=5,
                         n_experts=4 if moe else 0, n_active_experts=2 if moe else 0,
                         moe_hidden_dim=128 if moe else None)
    return synthetic.write_random_model(path, header, seed)


@contextmanager
def loopback_workers(n: int, model_path: Path | None = None):
    """`n` workers on 127.0.0.1 ephemeral ports, each in a thread with its own real socket."""
    workers = [Worker("127.0.0.1", 0, model_path=model_path, log=lambda msg: None) for _ in range(n)]
    threads = [threading.Thread(target=w.serve_forever, daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(5)


def greedy(engine, prompt: np.ndarray, steps: int) -> list[int]:
    engine.reset()
    logits = engine.forward(prompt, 0)
    out = [int(np.argmax(logits[-1]))]
    for i in range(steps - 1):
        logits = engine.forward([out[-1]], len(prompt) + i)
        out.append(int(np.argmax(logits[-1])))
    return out
