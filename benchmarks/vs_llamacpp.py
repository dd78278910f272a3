"""Decode and prefill speed against llama.cpp on the same blocks, side by side.

    python benchmarks/vs_llamacpp.py [--threads 1,2] [--pairs 3] [--models smollm2,tinyllama] [--quants q40,q80]
    python benchmarks/vs_llamacpp.py --nodes 2 [--pairs 3]      # the cluster row: 2 nodes on loopback

What users would pick instead of dllama on one board is llama.cpp, so this compares the two on the
same weights: a GGUF Q4_0 (Q8_0) file and the `.m` that `dllama-convert gguf` copies its blocks into
(Q4_0 is q40 and Q8_0 is q80, block for block).

- llama.cpp is built once from the pinned `llama-cpp-python==0.3.36` sdist's vendored tree (cmake,
  GGML_NATIVE; llama-bench, llama-quantize, llama-server, ggml-rpc-server) into $DLLAMA_CACHE/llamacpp
  (minutes on 2 cores; needs cmake and g++). Nothing of it enters the repository.
- The GGUFs are made once under .bench/vsllama/ with llama-quantize --pure: SmolLM2-135M from its
  Q4_1 GGUF (python -m dllama.samples), and the TinyLlama-1.1B-shaped random checkpoint of
  benchmarks/decode.py written as an F16 GGUF with the Llama 2 vocabulary (from the fixtures' tokenizer.json).
- Each pair runs llama-bench (`-p P -n N -r 1`: prefill of P tokens, and N generated tokens after a
  prompt of P: `-d P` for the decode test) and our runtime (benchmarks/decode.py's child: a fresh
  process, P prompt tokens evaluated warm, then N greedy tokens), each a fresh process.

- `--nodes 2`: TinyLlama-shaped q40 on two processes of one thread each on 127.0.0.1: llama.cpp as a layer
  pipeline (`ggml-rpc-server -t 1` holding half the layers, `llama-bench --rpc ... -ngl <half> -t 1`), dllama
  as benchmarks/distributed.py runs it (a root and one `dllama-run worker`, tensor parallel), decode after
  the same prompt depth.

It prints, per model, quant and thread count, the medians and the median of the per-pair ratios
dllama / llama.cpp (tokens/s: above 1 means dllama is faster), and the read limit of this machine
for each model (a multi-threaded read of a buffer the size of the weights, best of 5), measured before
and after every pair, with each runtime's decode over the limit beside it (median of the pairs). The machine is shared
and noisy: only ratios of paired runs in one session mean anything; run under
`flock /tmp/dllama-bench.lock`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench" / "vsllama"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-bench", "llama-quantize", "llama-server", "ggml-rpc-server")
GGUF_TYPE = {"q40": "Q4_0", "q80": "Q8_0"}
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "tokenizers" / "llama2" / "tokenizer.json"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# llama.cpp, built once into the cache

def llamacpp_bin() -> Path:
    """The folder of the built llama.cpp programs; downloads the sdist and builds on first use."""
    from dllama.runtime.aot_kernels import cache_root

    home = cache_root() / "llamacpp" / LLAMA_CPP_PYTHON
    bin_dir = home / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    home.mkdir(parents=True, exist_ok=True)
    sdist = home / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        say(f"downloading the llama-cpp-python=={LLAMA_CPP_PYTHON} sdist (llama.cpp's source) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(home)], check=True)
    source = home / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not source.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(home, filter="data")
    say("building llama.cpp (once per machine; minutes on 2 cores) ...")
    subprocess.run(["cmake", "-S", str(source), "-B", str(home / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(home / "build"), "-j", str(os.cpu_count() or 2), "--target", *TARGETS],
                   check=True, stdout=subprocess.DEVNULL)
    return bin_dir


# --------------------------------------------------------------------------------------------
# The same blocks on both sides

def quantized(bin_dir: Path, source: Path, target: Path, gguf_type: str) -> Path:
    if not target.is_file():
        say(f"llama-quantize --pure {source.name} -> {target.name} ...")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.gguf")
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", "--pure", str(source), str(partial),
                        gguf_type], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(partial, target)
    return target


def smollm2_source() -> Path:
    from dllama.samples import fetch

    return fetch(quiet=True)


def tinyllama_source() -> Path:
    """The TinyLlama-shaped random checkpoint of benchmarks/decode.py as an F16 GGUF with Llama 2's vocabulary."""
    import numpy as np
    from convert import ensure_checkpoint  # benchmarks/convert.py's, which benchmarks/decode.py converts
    from gguf import GGUFReader, GGUFWriter
    from gguf_helpers import _llama_cpp_tensors, add_model_metadata, write_llama_bpe_vocab_gguf

    from dllama.checkpoint import Checkpoint

    target = BENCH / "tinyllama-f16.gguf"
    if target.is_file():
        return target
    checkpoint = ensure_checkpoint()  # built once
    say(f"writing {target.name} (once) ...")
    BENCH.mkdir(parents=True, exist_ok=True)
    vocab = write_llama_bpe_vocab_gguf(LLAMA2_TOKENIZER, BENCH / "llama2-vocab.gguf")

    ckpt = Checkpoint(checkpoint)
    c = ckpt.config
    partial = target.with_suffix(".partial")
    writer = GGUFWriter(partial, "llama")
    add_model_metadata(writer, c)
    writer.add_file_type(1)  # mostly F16
    for key, field in GGUFReader(vocab).fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1]
                                 if len(field.types) > 1 else None)
    for name, values in _llama_cpp_tensors(ckpt, "llama"):
        writer.add_tensor(name, values.astype(np.float16 if values.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)
    return target


SOURCES = {"smollm2": smollm2_source, "tinyllama": tinyllama_source}


def model_pair(bin_dir: Path, model: str, quant: str) -> tuple[Path, Path]:
    """(GGUF, .m) holding the same blocks."""
    from dllama.converter.convert import convert

    gguf = quantized(bin_dir, SOURCES[model](), BENCH / f"{model}-{GGUF_TYPE[quant]}.gguf", GGUF_TYPE[quant])
    m = BENCH / f"dllama_model_{model}-{quant}_{quant}.m"
    if not m.is_file():
        convert(gguf, quant, BENCH, name=f"{model}-{quant}", with_tokenizer=False)
    return gguf, m


# --------------------------------------------------------------------------------------------
# One pair

def run_llamacpp(bin_dir: Path, gguf: Path, threads: int, prompt: int, generated: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one llama-bench process."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
                          "-n", "0", "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    prefill = json.loads(out.stdout)[0]["avg_ts"]
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
                          "-n", str(generated), "-d", str(prompt), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True)
    return prefill, json.loads(out.stdout)[0]["avg_ts"]


def run_dllama(m: Path, threads: int, prompt: int, generated: int) -> tuple[float, float]:
    from decode import run_child

    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    r = run_child(["--model", str(m), "--prompt-tokens", str(prompt), "--steps", str(generated),
                   "--nthreads", str(threads), "--max-seq-len", str(prompt + generated + 8)])
    return r["prompt_tok_s"], r["gen_tok_s"]


def wait_for_port(port: int, server: subprocess.Popen, seconds: float = 30) -> None:
    """Until the server accepts a connection on 127.0.0.1:port (it prints nothing that says so)."""
    import socket
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"ggml-rpc-server did not listen on port {port} within {seconds:.0f} s")


def run_llamacpp_rpc(bin_dir: Path, gguf: Path, layers: int, prompt: int, generated: int) -> float:
    """Decode tok/s of llama-bench with half the layers on a local ggml-rpc-server (two 1-thread processes)."""
    import socket

    with socket.socket() as s:  # a free port for the server (it takes no port 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "--rpc", f"127.0.0.1:{port}",
                              "-ngl", str(layers // 2), "-t", "1", "-p", "0", "-n", str(generated), "-d", str(prompt),
                              "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)[0]["avg_ts"]
    finally:
        server.terminate()
        server.wait()


def run_dllama_cluster(m: Path, generated: int) -> float:
    """Decode tok/s of a root and one worker, one thread each (benchmarks/distributed.py's measure)."""
    import distributed

    distributed.MODEL = m
    args = argparse.Namespace(steps=generated, max_seq_len=len(distributed.PROMPT) + generated + 8,
                              buffer_float_type=None)
    return 1000 / distributed.measure("2", args)["ms_per_token"]


def cluster_row(bin_dir: Path, pairs: int, generated: int) -> None:
    import distributed

    from dllama.formats import ModelFile

    gguf, m = model_pair(bin_dir, "tinyllama", "q40")
    layers = ModelFile(m).header.n_layers
    depth = len(distributed.PROMPT)
    theirs, ours = [], []
    for _ in range(pairs):
        theirs.append(run_llamacpp_rpc(bin_dir, gguf, layers, depth, generated))
        ours.append(run_dllama_cluster(m, generated))
    ratio = statistics.median(o / t for o, t in zip(ours, theirs))
    print("| model | nodes | measure | llama.cpp RPC tok/s | dllama tok/s | dllama / llama.cpp (median of pairs) |")
    print("|---|---|---|---|---|---|")
    print(f"| tinyllama q40 | 2 on loopback, 1 thread each | decode {generated} after {depth} | "
          f"{statistics.median(theirs):.1f} | {statistics.median(ours):.1f} | {ratio:.2f} |", flush=True)
    print(f"pairs: llama.cpp {', '.join(f'{t:.1f}' for t in theirs)}; dllama {', '.join(f'{o:.1f}' for o in ours)}")


def read_limit(per_token: int, threads: int) -> float:
    """Tokens/s if a token cost only reading its `per_token` bytes at this machine's read rate now."""
    from vs_reference import read_bandwidth

    return read_bandwidth(per_token, threads) * 1e9 / per_token


def print_rows(model: str, quant: str, threads: int, theirs: list, ours: list, limits: list) -> None:
    """A row per measure: medians, the median of the per-pair ratios, and each runtime's decode over the read limit
    measured beside its pair (before and after it, averaged): the machine's memory is shared, and its read rate
    moves from minute to minute as much as either runtime's does."""
    for i, measure in enumerate(("prefill", "decode")):
        ratio = statistics.median(o[i] / t[i] for o, t in zip(ours, theirs))
        their_median, our_median = statistics.median(t[i] for t in theirs), statistics.median(o[i] for o in ours)
        of_limit = "| - | - |"
        if measure == "decode":
            ours_of, theirs_of = (statistics.median(r[i] / limit for r, limit in zip(runs, limits))
                                  for runs in (ours, theirs))
            of_limit = f"| {ours_of:.2f} | {theirs_of:.2f} |"
        print(f"| {model} | {quant} | {threads} | {measure} | {their_median:.1f} | {our_median:.1f} | {ratio:.2f} "
              f"| {statistics.median(limits):.1f} {of_limit}", flush=True)
    print("pairs (decode tok/s, llama.cpp / dllama / read limit): "
          + "; ".join(f"{t[1]:.1f} / {o[1]:.1f} / {lim:.1f}" for t, o, lim in zip(theirs, ours, limits)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--models", default="smollm2,tinyllama")
    parser.add_argument("--quants", default="q40,q80")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill, and the decode's depth)")
    parser.add_argument("--generated", type=int, default=128)
    parser.add_argument("--nodes", type=int, choices=[2], help="the cluster row instead: 2 nodes on loopback")
    args = parser.parse_args()
    from vs_reference import bytes_per_token

    bin_dir = llamacpp_bin()
    if args.nodes:
        print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} before the runs; {args.pairs} pairs")
        cluster_row(bin_dir, args.pairs, args.generated)
        print(f"load after the runs: {os.getloadavg()[0]:.2f}")
        return
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} before the runs; {args.pairs} pairs per "
          f"row; prefill of {args.prompt} tokens; {args.generated} generated after it")
    print("| model | quant | threads | measure | llama.cpp tok/s | dllama tok/s | dllama / llama.cpp (median of pairs) "
          "| read limit tok/s | dllama / read limit | llama.cpp / read limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for quant in args.quants.split(","):
            gguf, m = model_pair(bin_dir, model, quant)
            per_token = bytes_per_token(m)
            run_dllama(m, 1, 8, 2)  # warm-up: kernels loaded, file in the page cache
            run_llamacpp(bin_dir, gguf, 1, 8, 2)
            for threads in [int(t) for t in args.threads.split(",")]:
                theirs, ours, limits = [], [], []
                for _ in range(args.pairs):
                    before = read_limit(per_token, threads)
                    theirs.append(run_llamacpp(bin_dir, gguf, threads, args.prompt, args.generated))
                    ours.append(run_dllama(m, threads, args.prompt, args.generated))
                    limits.append((before + read_limit(per_token, threads)) / 2)
                print_rows(model, quant, threads, theirs, ours, limits)
    print(f"load after the runs: {os.getloadavg()[0]:.2f}; llama.cpp from llama-cpp-python=={LLAMA_CPP_PYTHON}'s "
          "vendored tree (cmake, GGML_NATIVE)")


if __name__ == "__main__":
    main()
