"""Logits of every conformance .m file (q40, q80, f32) into OUT/<model>_<quant>.npy, for a
bit-for-bit comparison between machines (.ci/arm64: x86 against emulated aarch64).

    python .ci/logits.py tests/fixtures/conformance OUT

Each file: its first reference prompt as one batch (the prefill kernels), then 3 tokens one at
a time (the single-token kernels), on 2 threads.
"""
import sys
from pathlib import Path

import numpy as np

from dllama.runtime import dispatch
from dllama.runtime.engine import Engine


def logits(path: Path, prompt: list[int]) -> np.ndarray:
    engine = Engine.load(path, max_seq_len=64, nthreads=2)
    rows = [engine.forward(prompt, 0)]
    for step in range(3):
        rows.append(engine.forward([int(rows[-1][-1].argmax())], len(prompt) + step))
    return np.concatenate(rows)


def main(conformance: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for model in sorted(p for p in conformance.iterdir() if p.is_dir()):
        prompt = np.load(model / "reference_logits.npz")["ids0"].tolist()
        for quant in ("q40", "q80", "f32"):
            np.save(out / f"{model.name}_{quant}.npy", logits(model / f"expected_{quant}.m", prompt))
    print(f"logits of {len(list(out.glob('*.npy')))} files, {dispatch.implementation()} kernels, "
          f"{dispatch.kernel_path()} path", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
