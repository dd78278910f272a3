"""Decode and prefill speed against the reference C++ runtime, side by side on the same files.

    python benchmarks/vs_reference.py [--threads 1,2] [--pairs 3] [--models smollm2,tinyllama]
    python benchmarks/vs_reference.py --nodes 2 --models tinyllama   # 2 nodes on loopback, 1 thread each

Builds the reference from ../shared/reference once (into $DLLAMA_CACHE/reference, ~30 s), makes
the two q40 files once under .bench/vsref/ (SmolLM2-135M from its GGUF, and a TinyLlama-1.1B-shaped
random model with a synthetic 32000-token byte vocabulary), then for each model and thread count
runs the reference's `dllama inference` and our `dllama-run` in alternation, `--pairs` times, each
a fresh process, greedy, on prompts of the same length in tokens (the reference tokenizes SmolLM2's
text one id per character, so ours repeats the text's words until it tokenizes to as many: both
then evaluate as many prompt tokens and generate at the same positions). It prints the median of the per-pair ratios
ours / reference for generated and prompt tokens/s, and the memory-bandwidth limit of this
machine: a multi-threaded read of a buffer the size of the weights, and the decode speed that
would allow (weights read once per token; the f32 embedding is read one row per token).
With --nodes 2 each runtime runs as a root and one worker on 127.0.0.1, one thread per node
(the reference's `dllama worker --port P --nthreads 1` and `--workers 127.0.0.1:P`; ours
`dllama-run worker` and `--workers`), and the table gives ms per generated token.
The machine is shared and noisy: only ratios of paired runs in one session mean anything.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench" / "vsref"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPT = ("The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun near "
          "the old stone wall of the quiet village")
GENERATED = 64
OURS = re.compile(r"prompt: (\d+) tokens, ([\d.]+) tokens/s \| generated: (\d+) tokens, ([\d.]+) tokens/s")
THEIRS = re.compile(r"Evaluation\n.*?nTokens: (\d+)\n\s*tokens/s: ([\d.]+)"
                    r".*?Prediction\n\s*nTokens: (\d+)\n\s*tokens/s: ([\d.]+)", re.DOTALL)


def smollm2_files() -> tuple[Path, Path]:
    from dllama.converter.convert import convert
    from dllama.samples import fetch

    model = BENCH / "dllama_model_smollm2_q40.m"
    if not model.is_file():
        convert(fetch(quiet=True), "q40", BENCH, name="smollm2")
    return model, BENCH / "dllama_tokenizer_smollm2.t"


def byte_tokenizer(folder: Path = BENCH) -> Path:
    """A 32000-token .t for TinyLlama-shaped models: every byte a token (prompts tokenize alike in both
    runtimes), the rest fillers."""
    from dllama.formats import TokenizerFile, atomic_output

    tokenizer = folder / "dllama_tokenizer_bytes32000.t"
    if not tokenizer.is_file():
        tokens = [bytes([b]) for b in range(256)] + [f"<filler{i}>".encode() for i in range(32000 - 256)]
        tf = TokenizerFile(tokens=tokens, scores=[0.0] * 32000, bos_id=1, eos_ids=[2], add_bos=True)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(tokenizer) as f:
            tf.write(f)
    return tokenizer


def tinyllama_files() -> tuple[Path, Path]:
    from decode import ensure_model

    return ensure_model(), byte_tokenizer()


MODELS = {"smollm2": smollm2_files, "tinyllama": tinyllama_files}


def run_reference(binary: Path, model: Path, tokenizer: Path, threads: int, prompt_tokens: int,
                  workers: tuple[str, ...] = ()) -> tuple[float, float, int]:
    steps = prompt_tokens + GENERATED
    cmd = [str(binary), "inference", "--model", str(model), "--tokenizer", str(tokenizer), "--prompt", PROMPT,
           "--steps", str(steps), "--nthreads", str(threads), "--buffer-float-type", "q80", "--temperature", "0",
           "--seed", "1"]
    if workers:
        cmd += ["--workers", *workers]
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=True)
    match = THEIRS.search(out.stdout)
    if not match:
        raise RuntimeError(f"no timing in the reference's output: {out.stdout[-1000:]}")
    return float(match.group(4)), float(match.group(2)), int(match.group(1))


def prompt_of(tokenizer: Path, n_tokens: int) -> str:
    """PROMPT's words, repeated as needed, up to the first text our tokenizer makes n_tokens or more
    tokens of: the reference tokenizes one id per character, so the same text would give it 4x the
    tokens to evaluate (and to attend over while generating) that it gives us."""
    from dllama.tokenizer import Tokenizer

    tok = Tokenizer.load(str(tokenizer))
    words = PROMPT.split()
    text = ""
    for i in range(100 * len(words)):
        text = f"{text} {words[i % len(words)]}".lstrip()
        if len(tok.encode(text)) >= n_tokens:
            break
    return text


def run_ours(model: Path, tokenizer: Path, threads: int, workers: tuple[str, ...] = (),
             prompt: str = PROMPT) -> tuple[float, float, int]:
    cmd = [sys.executable, "-m", "dllama.cli.dllama_run", "--model", str(model), "--tokenizer", str(tokenizer),
           "--prompt", prompt, "--steps", str(GENERATED), "--temperature", "0", "--nthreads", str(threads)]
    if workers:
        cmd += ["--workers", ",".join(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=threads_env(threads))
    match = OURS.search(out.stderr)
    if not match:
        raise RuntimeError(f"no timing in dllama-run's output: {out.stderr[-1000:]}")
    return float(match.group(4)), float(match.group(2)), int(match.group(1))


def threads_env(threads: int) -> dict:
    return dict(os.environ, NUMBA_NUM_THREADS=str(threads))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """One worker process on 127.0.0.1 with one thread, ours or the reference's, for a --nodes 2 pair."""

    def __init__(self, reference: Path | None):
        if reference is not None:
            port = free_port()
            self.proc = subprocess.Popen([str(reference), "worker", "--port", str(port), "--nthreads", "1"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.address = f"127.0.0.1:{port}"
            time.sleep(0.5)  # the reference's root retries a worker that is not listening yet, ours does not
            return
        self.proc = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host",
                                      "127.0.0.1", "--port", "0", "--nthreads", "1"], stderr=subprocess.PIPE,
                                     text=True, env=threads_env(1))
        found = re.search(r"listening on ([\d.]+:\d+)", self.proc.stderr.readline())
        if not found:
            raise RuntimeError("our worker did not start")
        self.address = found.group(1)

    def __enter__(self) -> str:
        return self.address

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait()


def read_bandwidth(nbytes: int, threads: int, repeat: int = 5) -> float:
    """GB/s of `threads` threads each summing its share of one buffer (numpy releases the GIL)."""
    data = np.ones(nbytes // 8, dtype=np.float64)
    shares = np.array_split(data, threads)
    best = float("inf")
    for _ in range(repeat):
        workers = [threading.Thread(target=np.add.reduce, args=(share,)) for share in shares]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def bytes_per_token(model: Path) -> int:
    from dllama.formats import ModelFile

    m = ModelFile(model)
    embedding = m.layout["embedding"].spec.nbytes
    return model.stat().st_size - embedding + embedding // m.header.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--models", default="smollm2,tinyllama")
    parser.add_argument("--nodes", type=int, default=1, choices=(1, 2), help="2: root and one worker, 1 thread each")
    parser.add_argument("--reference", type=Path, default=None,
                        help="the reference's dllama binary (default: built from ../shared/reference)")
    args = parser.parse_args()
    if args.reference is None:
        from reference_runtime import build_reference
        args.reference = build_reference()
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} before the runs; {args.pairs} pairs per row; "
          f"{GENERATED} generated tokens; q40 weights, q80 activations in both")
    if args.nodes == 2:
        two_nodes(args)
    else:
        one_node(args)
    print(f"load after the runs: {os.getloadavg()[0]:.2f}")


def one_node(args) -> None:
    binary = args.reference
    print("| model | threads | reference gen tok/s | ours gen tok/s | gen ours/ref (median) | reference prompt tok/s "
          "| ours prompt tok/s | prompt ours/ref (median) | bandwidth limit gen tok/s | ours / limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model, tokenizer = MODELS[name]()
        per_token = bytes_per_token(model)
        _, _, ref_tokens = run_reference(binary, model, tokenizer, 1, len(PROMPT) + 1)  # warm-up, its token count
        prompt = prompt_of(tokenizer, ref_tokens)
        _, _, our_tokens = run_ours(model, tokenizer, 1, prompt=prompt)  # warm-up: kernels built/loaded
        for threads in [int(t) for t in args.threads.split(",")]:
            ref_gen, ref_pre, our_gen, our_pre = [], [], [], []
            for _ in range(args.pairs):
                g, p, _ = run_reference(binary, model, tokenizer, threads, len(PROMPT) + 1)
                ref_gen.append(g)
                ref_pre.append(p)
                g, p, _ = run_ours(model, tokenizer, threads, prompt=prompt)
                our_gen.append(g)
                our_pre.append(p)
            limit = read_bandwidth(per_token, threads) * 1e9 / per_token
            gen_ratio = statistics.median(o / r for o, r in zip(our_gen, ref_gen))
            pre_ratio = statistics.median(o / r for o, r in zip(our_pre, ref_pre))
            print(f"| {name} | {threads} | {statistics.median(ref_gen):.1f} | {statistics.median(our_gen):.1f} | "
                  f"{gen_ratio:.2f} | {statistics.median(ref_pre):.1f} | {statistics.median(our_pre):.1f} | "
                  f"{pre_ratio:.2f} | {limit:.1f} | {statistics.median(our_gen) / limit:.2f} |", flush=True)
        print(f"({name}: the reference evaluates {ref_tokens} prompt tokens (one id per character), we evaluate "
              f"{our_tokens} (faithful tokenization of {len(prompt)} characters))")


def two_nodes(args) -> None:
    print("| model | nodes x threads | reference ms/token | ours ms/token | ours/ref ms (median of pairs) |")
    print("|---|---|---|---|---|")
    from dllama.formats import ModelFile

    for name in args.models.split(","):
        model, tokenizer = MODELS[name]()
        kv_heads = ModelFile(model).header.n_kv_heads
        if kv_heads % 2:  # the reference splits whole kv heads between its nodes, and aborts otherwise
            print(f"| {name} | 2 x 1 | (the reference cannot split {kv_heads} kv heads between 2 nodes) | | |")
            continue
        with Worker(None) as worker:  # warm-up: kernels built/loaded, file cached
            run_ours(model, tokenizer, 1, (worker,))
        ref_ms, our_ms = [], []
        for _ in range(args.pairs):
            with Worker(args.reference) as worker:
                ref_ms.append(1000 / run_reference(args.reference, model, tokenizer, 1, len(PROMPT) + 1, (worker,))[0])
            with Worker(None) as worker:
                our_ms.append(1000 / run_ours(model, tokenizer, 1, (worker,))[0])
        ratio = statistics.median(o / r for o, r in zip(our_ms, ref_ms))
        print(f"| {name} | 2 x 1 | {statistics.median(ref_ms):.1f} | {statistics.median(our_ms):.1f} | {ratio:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
