"""How far SmolLM2-135M's logits move with the node count, against the f32 model.

    python -m dllama.samples                      # once: SmolLM2's GGUF into the cache
    python benchmarks/distributed_smollm2.py      # converts it to f32 and q40 under .bench/smollm2
    python benchmarks/distributed_smollm2.py --exchanges    # mesh against slices (q80 buffers) only

For each node count and exchange type, the mean and largest |logits - f32 one node| over a
21-token prompt, the same for q40 on one node, and the largest difference from q40 on one node.
Workers run in threads on loopback, each loading its slices from the same file. --exchanges: the
q40 model with q80 buffers through `--exchange mesh` and `--exchange slices` (which rounds each
seam's sum through q80 once more), against q40 on one node (no rounding) over a longer text: mean
KL divergence of the next-token distributions, top-1 agreement, largest |logits difference|.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / ".bench" / "smollm2"
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. Once upon a time, there was"


def converted(quant: str) -> Path:
    path = OUT / f"dllama_model_smollm2_{quant}.m"
    if not path.is_file():
        from dllama.samples import cached

        gguf = cached()
        if gguf is None:
            raise SystemExit("SmolLM2's GGUF is not in the cache: run `python -m dllama.samples` once")
        subprocess.run([sys.executable, "-m", "dllama.cli.dllama_convert", "gguf", str(gguf), "--quant", quant,
                        "--name",
                        "smollm2", "--output-dir", str(OUT)], check=True, stdout=subprocess.DEVNULL)
    return path


TEXT = ("The history of the Roman Empire spans many centuries. It began when Augustus became the first emperor, "
        "and it ended in the west in 476. Its roads, laws and language shaped Europe for a thousand years. "
        "Today, historians still debate why it fell: some blame the economy, others the army or the climate.")


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def compare_exchanges() -> None:
    from distributed_helpers import loopback_workers

    from dllama.runtime.distributed.root import DistributedEngine
    from dllama.runtime.engine import Engine
    from dllama.tokenizer import Tokenizer

    q40 = converted("q40")
    ids = np.array(Tokenizer.load(str(OUT / "dllama_tokenizer_smollm2.t")).encode(TEXT))
    one = Engine.load(q40, max_seq_len=128, nthreads=1).forward(ids, 0).astype(np.float64)
    p = softmax(one)
    print(f"{len(ids)} tokens; q40, q80 buffers, against q40 on one node\n")
    print("| nodes | exchange | mean KL | top-1 agreement | max abs logits difference |\n|---|---|---|---|---|")
    for n in (3, 9):
        for exchange in ("mesh", "slices"):
            with loopback_workers(n - 1, model_path=q40) as workers, \
                    DistributedEngine(q40, [w.address for w in workers], max_seq_len=128, buffer_type="q80",
                                      nthreads=1, log=lambda m: None, exchange=exchange) as engine:
                got = engine.forward(ids, 0).astype(np.float64)
            kl = (p * (np.log(p + 1e-300) - np.log(softmax(got) + 1e-300))).sum(-1)
            agree = (np.argmax(got, -1) == np.argmax(one, -1)).mean()
            print(f"| {n} | {exchange} | {kl.mean():.2e} | {agree:.3f} | {np.abs(got - one).max():.2f} |")


def main() -> None:
    from distributed_helpers import loopback_workers

    from dllama.runtime.distributed.root import DistributedEngine
    from dllama.runtime.engine import Engine
    from dllama.tokenizer import Tokenizer

    f32, q40 = converted("f32"), converted("q40")
    ids = np.array(Tokenizer.load(str(OUT / "dllama_tokenizer_smollm2.t")).encode(PROMPT))
    ref = Engine.load(f32, max_seq_len=64, nthreads=1).forward(ids, 0)
    one = Engine.load(q40, max_seq_len=64, nthreads=1).forward(ids, 0)
    print("| q40 on | exchange | mean / max vs f32 | max vs q40 one node |\n|---|---|---|---|")
    print(f"| 1 node | - | {np.abs(one - ref).mean():.2f} / {np.abs(one - ref).max():.1f} | - |")
    for n in (2, 3, 5, 9):
        for buffer_type in ("q80", "f32"):
            with loopback_workers(n - 1, model_path=q40) as workers, \
                    DistributedEngine(q40, [w.address for w in workers], max_seq_len=64, buffer_type=buffer_type,
                                      nthreads=1, log=lambda m: None) as engine:
                got = engine.forward(ids, 0)
            print(f"| {n} nodes | {buffer_type} | {np.abs(got - ref).mean():.2f} / {np.abs(got - ref).max():.1f} | "
                  f"{np.abs(got - one).max():.1f} |")
    for n in (2, 3, 9):
        with loopback_workers(n - 1, model_path=f32) as workers, \
                DistributedEngine(f32, [w.address for w in workers], max_seq_len=64, buffer_type="f32", nthreads=1,
                                  log=lambda m: None) as engine:
            print(f"f32 model, {n} nodes, f32 exchange: max |logits - one node| = "
                  f"{np.abs(engine.forward(ids, 0) - ref).max():.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", action="store_true", help="mesh against slices with q80 buffers only")
    compare_exchanges() if parser.parse_args().exchanges else main()
