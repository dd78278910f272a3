"""Helpers shared by the distributed tests: loopback workers and small models with many kv heads."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dllama.converter import synthetic
from dllama.formats import ArchType, FloatType, ModelHeader
from dllama.runtime.distributed.worker import Worker


def write_random_model(path: Path, float_type: FloatType, n_kv_heads: int = 4, seed: int = 0, moe: bool = False,
                       n_heads: int = 8, head_dim: int = 16, hidden_dim: int = 256, vocab_size: int = 256,
                       n_layers: int = 2) -> Path:
    """A llama-shaped .m (8 heads, 4 kv heads by default; the fixtures have 2 kv heads), or a
    qwen3_moe-shaped one (4 experts, 2 active, q/k norms)."""
    header = ModelHeader(arch=ArchType.QWEN3_MOE if moe else ArchType.LLAMA, dim=n_heads * head_dim,
                         hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=vocab_size, max_seq_len=128, weights_float_type=float_type, rope_theta=10000,
                         norm_epsilon_code=5, n_experts=4 if moe else 0, n_active_experts=2 if moe else 0,
                         moe_hidden_dim=128 if moe else None)
    return synthetic.write_random_model(path, header, seed)


def write_smollm2_shaped(path: Path, float_type: FloatType, n_layers: int = 2, seed: int = 0) -> Path:
    """SmolLM2-135M's attention and FFN shape (9 heads, 3 kv heads, head_dim 64, FFN 1536) with random
    weights, a small vocabulary and few layers: its uneven splits without the real model's size."""
    return write_random_model(path, float_type, n_kv_heads=3, seed=seed, n_heads=9, head_dim=64, hidden_dim=1536,
                              vocab_size=512, n_layers=n_layers)


@contextmanager
def loopback_workers(n: int, model_path: Path | None = None, cluster_key: bytes | None = None,
                     nthreads: int | None = None):
    """`n` workers on 127.0.0.1 ephemeral ports, each in a thread with its own real socket."""
    workers = [Worker("127.0.0.1", 0, model_path=model_path, log=lambda msg: None, cluster_key=cluster_key,
                      nthreads=nthreads) for _ in range(n)]
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


# f32 buffers: a cluster's logits against one node's (or transformers') differ only by float32 partials summed
# in another order. Measured: at most 2.0e-6 on the tiny and random models, 2 to 8 nodes, star, mesh and MPI
# (the one-node runtime is 2.2e-6 from transformers). 10x that catches what 1e-4 could miss on logits this
# small: a partial rounded through bf16 or f16 on its way (~1e-3 of its size), a norm epsilon off by 10x.
F32_CLUSTER_TOLERANCE = 2e-5
# SmolLM2 (30 layers, logits up to ~30): measured 5.6e-5 between node counts; its sums are deterministic
# for a node count, so 1.8x is margin enough, and a lost or doubled partial moves them by whole units.
F32_CLUSTER_TOLERANCE_SMOLLM2 = 1e-4


# FORMAT.md §2: with q80 buffers every node's partial is quantized on its own, so logits move with
# the node count (measured: up to 0.07 on random models whose logits span +-2.6). A greedy token may
# differ from one node's only where one node's top two logits are closer than this.
NODE_COUNT_EFFECT = 0.1


def assert_greedy_matches_up_to_near_ties(one, many, prompt, steps: int, near_tie: float = NODE_COUNT_EFFECT) -> None:
    """many's greedy tokens equal one's, or diverge first where one's top two logits are within `near_tie`."""
    want, got = greedy(one, prompt, steps), greedy(many, prompt, steps)
    if got == want:
        return
    first = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
    one.reset()
    logits = one.forward(list(prompt) + want[:first], 0)[-1]
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] < near_tie, f"diverges at token {first} without a near-tie: {want} vs {got}"


def greedy(engine, prompt: np.ndarray, steps: int) -> list[int]:
    engine.reset()
    logits = engine.forward(prompt, 0)
    out = [int(np.argmax(logits[-1]))]
    for i in range(steps - 1):
        logits = engine.forward([out[-1]], len(prompt) + i)
        out.append(int(np.argmax(logits[-1])))
    return out
