"""Single-node inference speed, memory and start-up on a TinyLlama-1.1B-shaped random q40 model.

    python benchmarks/decode.py [--threads 1,2] [--prompt-tokens 64] [--steps 32] [--max-seq-len 2048]
    python benchmarks/decode.py --sequences 1,2,4,8 [--threads 2] [--pairs 3] [--compare-with ../other-checkout]

Builds (once, under .bench/, ignored by git) a random bf16 TinyLlama-shaped checkpoint with
dllama.converter.synthetic and converts it to q40 with `dllama-convert`, then runs each thread
count in a fresh child process, as a user's `dllama-run` would: start-up to first generated
token (imports, cached kernels, mapping the model, prefill), prompt tokens/s (the batched
prefill run again, warm),
generated tokens/s and ms/token (greedy decode), peak RSS (the child's ru_maxrss) and the share
of decode time spent inside the kernels. A warm-up child compiles or loads the kernels
first. Targets: 2-core x86-64, 2 threads: >= 8.5 generated tokens/s (reference C++
7.05), >= 75 prompt tokens/s (reference 72.6); peak RSS <= file + KV cache + 100 MB; start-up
< 5 s with cached kernels.

--sequences: decode steps of several sequences at once instead (Engine.step, one token per KV cache slot,
what serve --parallel runs): the median ms of a step of N tokens and the tokens/s it gives, and its rate
over one sequence's. --compare-with DIR runs the same child from another checkout in alternation (pairs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
MODEL = BENCH / "decode" / "dllama_model_tinyllama_q40.m"  # what `dllama-convert --name tinyllama` writes


def ensure_model() -> Path:
    if MODEL.is_file():
        return MODEL
    from convert import ensure_checkpoint  # benchmarks/convert.py's: the checkpoint with its tokenizer

    checkpoint = ensure_checkpoint()
    print(f"converting to {MODEL} (once) ...", file=sys.stderr, flush=True)
    from dllama.converter.convert import convert

    # the default (error-aware) encoder calibrates on text, so the checkpoint carries Llama 2's tokenizer
    convert(checkpoint, "q40", MODEL.parent, name="tinyllama", with_tokenizer=False)
    return MODEL


# --------------------------------------------------------------------------------------------
# The child: one measured run

def child(model: str, nthreads: int, prompt_tokens: int, steps: int, max_seq_len: int) -> dict:
    started = time.perf_counter()
    import numpy as np

    from dllama.runtime import dispatch, tensors
    from dllama.runtime.engine import Engine

    engine = Engine.load(model, max_seq_len=max_seq_len, nthreads=nthreads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, engine.vocab_size, prompt_tokens).tolist()
    token = int(engine.forward(prompt, 0)[-1].argmax())
    first_token = time.perf_counter() - started  # cold: includes loading each cached kernel on first use
    engine.reset()
    t0 = time.perf_counter()
    token = int(engine.forward(prompt, 0)[-1].argmax())
    t1 = time.perf_counter()
    pos, step_times = prompt_tokens, []
    for _ in range(steps):
        a = time.perf_counter()
        token = int(engine.forward([token], pos)[0].argmax())
        step_times.append(time.perf_counter() - a)
        pos += 1
    kernel_share = _kernel_share(engine, dispatch, tensors, token, pos, 8)
    import resource

    return {
        "nthreads": nthreads, "prompt_tokens": prompt_tokens, "steps": steps,
        "prompt_tok_s": prompt_tokens / (t1 - t0),
        "gen_tok_s": steps / sum(step_times), "ms_per_token": 1000 * sum(step_times) / steps,
        "ms_per_token_median": 1000 * float(np.median(step_times)),
        "startup_to_first_token_s": first_token, "kernel_share": kernel_share,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "kv_cache_bytes": engine.layers.kv_cache_bytes, "model_bytes": os.path.getsize(model),
        "kernels": dispatch.implementation(), "numba_loaded": "numba" in sys.modules,
    }


def sequences_child(model: str, nthreads: int, sequences: list[int], steps: int, max_seq_len: int) -> dict:
    """Median ms of an Engine.step of n decode tokens, one per KV cache slot, for each n of `sequences`."""
    import numpy as np

    from dllama.runtime.engine import Engine, SlotRun

    engine = Engine.load(model, max_seq_len=max_seq_len, nthreads=nthreads, slots=max(sequences))
    prompt = 8
    medians = {}
    for n in sequences:
        engine.reset()
        for slot in range(engine.slots):  # every slot holds its prompt, so each step decodes at the same depth
            engine.step([SlotRun(slot, [1 + slot] * prompt, 0, last_only=True)])
        times = []
        for i in range(steps + 2):  # two warm-up steps
            runs = [SlotRun(slot, [3 + slot + i], prompt + i) for slot in range(n)]
            a = time.perf_counter()
            engine.step(runs)
            times.append(time.perf_counter() - a)
        medians[n] = 1000 * float(np.median(times[2:]))
    return {"nthreads": nthreads, "step_ms": medians}


def _kernel_share(engine, dispatch, tensors, token: int, pos: int, steps: int) -> float:
    """Share of decode wall time inside the kernels (matmuls, quantization, attention, or the compiled programs
    that run them all)."""
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            a = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - a
        return wrapper

    matmul, attention = tensors.Matrix.__matmul__, dispatch.attention
    prepare, roundtrip, program = tensors.QuantizedInput.of, dispatch.q80_roundtrip, dispatch.Program.run
    dispatch.Program.run = timed(program)
    tensors.Matrix.__matmul__ = timed(matmul)
    tensors.QuantizedInput.of = timed(prepare)
    dispatch.attention = timed(attention)
    dispatch.q80_roundtrip = timed(roundtrip)
    try:
        a = time.perf_counter()
        for i in range(steps):
            token = int(engine.forward([token], pos + i)[0].argmax())
        total = time.perf_counter() - a
    finally:
        tensors.Matrix.__matmul__, tensors.QuantizedInput.of = matmul, prepare
        dispatch.attention, dispatch.q80_roundtrip = attention, roundtrip
        dispatch.Program.run = program
    return spent[0] / total


# --------------------------------------------------------------------------------------------

def run_child(args: list[str], checkout: Path = ROOT) -> dict:
    """This script's child, run with `checkout`'s dllama."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sequences(model: Path, a) -> None:
    """--sequences: one row per run and checkout, each step size's ms and tok/s, and N sequences' rate over one's."""
    threads = int(a.threads.split(",")[-1])
    counts = [int(n) for n in a.sequences.split(",")]
    checkouts = [ROOT] + ([a.compare_with.resolve()] if a.compare_with else [])
    args = ["--model", str(model), "--sequences", a.sequences, "--steps", str(a.steps), "--nthreads", str(threads),
            "--max-seq-len", "256"]
    for checkout in checkouts:  # compile or load each checkout's kernels
        run_child(args[:2] + ["--sequences", "1", "--steps", "1", "--nthreads", "1", "--max-seq-len", "64"], checkout)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; model {model.name}, "
          f"{threads} threads, median of {a.steps} steps", flush=True)
    print("| run | checkout | " + " | ".join(f"{n} seq: ms/step (tok/s)" for n in counts) + " | "
          + " | ".join(f"{n} over 1" for n in counts if n > 1) + " |")
    print("|---|---|" + "---|" * (2 * len(counts) - (1 in counts)))
    for run in range(a.pairs):
        for checkout in checkouts:
            ms = {int(n): v for n, v in run_child(args, checkout)["step_ms"].items()}
            rate = {n: n * 1000 / ms[n] for n in counts}
            cells = [f"{ms[n]:.1f} ({rate[n]:.1f})" for n in counts]
            ratios = [f"{rate[n] / rate[1]:.2f}x" for n in counts if n > 1 and 1 in rate]
            print(f"| {run + 1} | {checkout.name} | " + " | ".join(cells + ratios) + " |", flush=True)
    print(f"load after the runs: {os.getloadavg()[0]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--model", help="use this .m instead of building the TinyLlama-shaped one")
    p.add_argument("--kernels", default="auto", choices=["auto", "compiled", "jit"],
                   help="which kernels the runs use (DLLAMA_KERNELS, dllama/runtime/dispatch.py)")
    p.add_argument("--sequences", help="decode steps of this many sequences at once instead, e.g. 1,2,4,8")
    p.add_argument("--pairs", type=int, default=3, help="--sequences: runs (pairs with --compare-with)")
    p.add_argument("--compare-with", type=Path, help="--sequences: another checkout, run in alternation")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nthreads", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child and a.sequences:
        counts = [int(n) for n in a.sequences.split(",")]
        print(json.dumps(sequences_child(a.model, a.nthreads, counts, a.steps, a.max_seq_len)))
        return
    if a.child:
        print(json.dumps(child(a.model, a.nthreads, a.prompt_tokens, a.steps, a.max_seq_len)))
        return
    model = Path(a.model) if a.model else ensure_model()
    if a.sequences:
        return sequences(model, a)
    os.environ["DLLAMA_KERNELS"] = a.kernels
    common = ["--model", str(model), "--prompt-tokens", str(a.prompt_tokens), "--max-seq-len", str(a.max_seq_len)]
    run_child(common + ["--steps", "2", "--nthreads", "1", "--prompt-tokens", "4"])  # compile / load kernels
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f} before the runs; model {model.name} {model.stat().st_size / 1e6:.0f} MB",
          flush=True)
    print("| threads | prompt tok/s | generated tok/s | ms/token | kernel share | start-up to 1st token | peak RSS "
          "| budget (file+KV+100MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [int(t) for t in a.threads.split(",")]:
        r = run_child(common + ["--steps", str(a.steps), "--nthreads", str(n)])
        budget = r["model_bytes"] + r["kv_cache_bytes"] + 100e6
        print(f"| {n} | {r['prompt_tok_s']:.1f} | {r['gen_tok_s']:.2f} | {r['ms_per_token']:.1f} | "
              f"{100 * r['kernel_share']:.0f}% | {r['startup_to_first_token_s']:.2f} s | "
              f"{r['peak_rss_bytes'] / 1e6:.0f} MB | {budget / 1e6:.0f} MB |", flush=True)
    vnni = "avx512_vnni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    print(f"load after the runs: {os.getloadavg()[0]:.2f}; kernels: {r['kernels']} "
          f"(numba loaded: {r['numba_loaded']}); CPU has AVX512-VNNI: {vnni}")


if __name__ == "__main__":
    main()
