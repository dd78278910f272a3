"""The main job end to end on a bundled example, with no network.

Run from anywhere: `python examples/run_example.py`. Each step is one function and prints what
it did; later steps (validate, run, a 2-node cluster) append here in the same style.

  1. build a small random Llama-shaped Hugging Face checkpoint under examples/tiny-hf/
     (weights from dllama.converter.synthetic, the bundled byte-level BPE tokenizer)
  2. convert it to examples/out/dllama_model_tiny_{q40,f32}.m and dllama_tokenizer_tiny.t
  3. validate both conversions against the original checkpoint (dllama-validate --hf)
  4. generate text from the q40 model with dllama-run (greedy)
  5. run the q40 model on a local 2-node cluster (a worker process on 127.0.0.1 + the root)
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from dllama.converter.cli import summary_text
from dllama.converter.convert import convert
from dllama.converter.synthetic import tiny_config, write_checkpoint

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "tiny-hf"
OUT = HERE / "out"
TOKENIZER = HERE / "tokenizer"  # tokenizer.json + tokenizer_config.json (see tokenizer/train.py)
NAME = "tiny"

# A small Llama: GQA (4 heads, 2 kv heads), vocab matching the bundled tokenizer (bos 510, eos 511)
CONFIG = tiny_config(
    "llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, bos_token_id=510, eos_token_id=511,
)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def build_checkpoint() -> Path:
    step(f"1. build a random Hugging Face checkpoint in {CHECKPOINT.relative_to(HERE.parent)}")
    shutil.rmtree(CHECKPOINT, ignore_errors=True)
    write_checkpoint(CHECKPOINT, CONFIG, dtype="bf16", seed=0, tokenizer=TOKENIZER)
    for f in sorted(CHECKPOINT.iterdir()):
        print(f"  {f.name:28} {f.stat().st_size:>10} bytes")
    return CHECKPOINT


def convert_checkpoint(checkpoint: Path) -> dict[str, Path]:
    step(f"2. convert it (dllama-convert hf {checkpoint.relative_to(HERE.parent)} --quant q40|f32 "
         f"--name {NAME} --output-dir {OUT.relative_to(HERE.parent)})")
    outputs = {}
    for quant in ("q40", "f32"):
        result = convert(checkpoint, quant, OUT, name=NAME)
        print(summary_text(result))
        outputs[quant] = result.plan.model_path
        outputs["tokenizer"] = result.plan.tokenizer_path
    return outputs


def validate_outputs(checkpoint: Path, outputs: dict[str, Path]) -> bool:
    """dllama-validate MODEL.m TOKENIZER.t --hf SOURCE for each conversion; the table for q40."""
    from dllama.validate.validator import validate

    ok = True
    for quant in ("q40", "f32"):
        model = outputs[quant]
        step(f"3. validate it (dllama-validate {model.relative_to(HERE.parent)} "
             f"{outputs['tokenizer'].relative_to(HERE.parent)} --hf {checkpoint.relative_to(HERE.parent)})")
        report = validate(model, outputs["tokenizer"], hf=checkpoint)
        print(report.table() if quant == "q40" else report.table().splitlines()[-1])
        ok = ok and report.ok
    return ok


def generate_text(outputs: dict[str, Path], prompt: str = "Once upon a time", steps: int = 24) -> None:
    """`dllama-run` exactly as a user types it: text on stdout, the timing summary on stderr."""
    import subprocess

    model, tokenizer = outputs["q40"], outputs["tokenizer"]
    args = ["--model", str(model), "--tokenizer", str(tokenizer), "--prompt", prompt, "--steps", str(steps),
            "--temperature", "0"]
    step(f"4. generate text (dllama-run --model {model.relative_to(HERE.parent)} --tokenizer "
         f"{tokenizer.relative_to(HERE.parent)} --prompt {prompt!r} --steps {steps} --temperature 0)")
    result = subprocess.run([sys.executable, "-m", "dllama.runtime.cli", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"dllama-run failed: {result.stderr.strip()}")
    print(f"  text  : {result.stdout.strip()!r}  (random weights: gibberish is expected)")
    print(f"  timing: {result.stderr.strip().splitlines()[-1]}")


def run_two_nodes(outputs: dict[str, Path], prompt: str = "Once upon a time", steps: int = 24) -> None:
    """A `dllama-run worker` process on 127.0.0.1 and `dllama-run --workers` as the root: the
    user's commands; then the same greedy tokens checked against one node in-process."""
    import re
    import subprocess

    model, tokenizer = outputs["q40"], outputs["tokenizer"]
    step(f"5. the same on a local 2-node cluster (dllama-run worker --host 127.0.0.1 --port P --nthreads 1; "
         f"dllama-run --workers 127.0.0.1:P --nthreads 1 --model {model.relative_to(HERE.parent)} ...)")
    # both nodes share this machine: one thread each
    worker = subprocess.Popen([sys.executable, "-m", "dllama.runtime.cli", "worker", "--host", "127.0.0.1", "--port", "0",
                               "--nthreads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        match = re.search(r"listening on ([\d.]+):(\d+)", worker.stderr.readline())
        if not match:
            raise RuntimeError("the worker did not start")
        address = f"{match.group(1)}:{match.group(2)}"
        args = ["--model", str(model), "--tokenizer", str(tokenizer), "--prompt", prompt, "--steps", str(steps),
                "--temperature", "0", "--workers", address, "--nthreads", "1"]
        result = subprocess.run([sys.executable, "-m", "dllama.runtime.cli", *args], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"dllama-run --workers failed: {result.stderr.strip()}")
        print(f"  worker: {address}")
        print(f"  text  : {result.stdout.strip()!r}")
        print(f"  timing: {result.stderr.strip().splitlines()[-1]}")
        compare_with_one_node(model, address, steps)
    finally:
        worker.terminate()
        worker.wait()


def compare_with_one_node(model: Path, address: str, steps: int) -> None:
    import numpy as np

    from dllama.runtime.distributed.root import DistributedEngine, parse_workers
    from dllama.runtime.engine import Engine

    prompt = [510, 72, 101, 108, 108, 111]

    def greedy(engine) -> list[int]:
        tokens = [int(np.argmax(engine.forward(prompt, 0)[-1]))]
        for i in range(steps - 1):
            tokens.append(int(np.argmax(engine.forward(tokens[-1:], len(prompt) + i)[-1])))
        return tokens

    one = greedy(Engine.load(model, max_seq_len=64, nthreads=1))
    with DistributedEngine(model, parse_workers(address), max_seq_len=64, nthreads=1, log=lambda msg: None) as root:
        two = greedy(root)
        t = root.traffic
    verdict = "the same" if one == two else "NOT the same (a near-tie: q80 partials depend on the node count)"
    print(f"  {verdict} {steps} greedy tokens as one node; per token the root sent {t.sent / t.tokens / 1000:.1f} kB "
          f"and received {t.received / t.tokens / 1000:.1f} kB")


def main() -> int:
    started = time.perf_counter()
    checkpoint = build_checkpoint()
    outputs = convert_checkpoint(checkpoint)
    if not validate_outputs(checkpoint, outputs):
        print("\nvalidation failed: see the FAIL lines above", file=sys.stderr)
        return 1
    generate_text(outputs)
    run_two_nodes(outputs)
    print(f"\ndone in {time.perf_counter() - started:.1f} s: {', '.join(str(p.relative_to(HERE.parent)) for p in outputs.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
