"""The reference C++ runtime (distributed-llama, ../shared/reference), built once per machine.

`build_reference()` unpacks the published source tarball outside the tree, into
$DLLAMA_CACHE/reference/<tarball name>/, and runs `make dllama` there (~30 s, needs g++ and
make); later calls reuse the binary. `run_inference` runs it greedily and returns the pieces it
printed, one per predicted token; `run_perplexity` returns the probability it gives each prompt token
(its token-by-token path). Both run one thread: its threads wait for each other by spinning, which on a
loaded 2-core machine made a 1 s run take 54 s (same results: each output row is one thread's).
`build_encoder` links tests/reference_tokenize.cpp with the binary's own
tokenizer.o, so that `reference_encode` gives the token ids the binary feeds its model.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

from dllama.runtime.aot_kernels import cache_root

SHARED_REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
ENCODER_SOURCE = Path(__file__).resolve().parent / "reference_tokenize.cpp"
_ENCODER_OBJECTS = ("tokenizer.o", "nn-quants.o", "nn-core.o", "llamafile-sgemm.o", "nn-cpu-ops.o")
_PRED_PIECE = re.compile(r"🔶 Pred[^|]*\|[^|]*\| (.*?)\n(?=🔶 Pred|\nEvaluation)", re.DOTALL)


def tarball() -> Path | None:
    found = sorted(SHARED_REFERENCE.glob("distributed-llama-*.tar.gz"))
    return found[0] if found else None


def build_reference(binary: str = "dllama") -> Path:
    """Path of the built reference binary; builds it on first use (raises on a failed build)."""
    source = tarball()
    if source is None:
        raise FileNotFoundError(f"no distributed-llama-*.tar.gz in {SHARED_REFERENCE}")
    name = source.name.removesuffix(".tar.gz")
    root = cache_root() / "reference"
    folder = root / name
    if (folder / binary).is_file():
        return folder / binary
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(source) as tar:
        tar.extractall(staging, filter="data")
    built = staging / name
    subprocess.run(["make", "-j2", binary], cwd=built, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(built, folder)
    shutil.rmtree(staging, ignore_errors=True)
    return folder / binary


def run_inference(binary: Path, model: Path, tokenizer: Path, prompt: str, steps: int, buffer_float_type: str,
                  nthreads: int = 1, timeout: float = 600) -> list[str]:
    """Greedy pieces the reference predicts (its --steps counts prompt positions too)."""
    result = subprocess.run(
        [str(binary), "inference", "--model", str(model), "--tokenizer", str(tokenizer), "--prompt", prompt,
         "--steps", str(steps), "--buffer-float-type", buffer_float_type, "--nthreads", str(nthreads),
         "--temperature", "0", "--seed", "1"],
        capture_output=True, timeout=timeout)
    output = result.stdout.decode("utf-8", errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"the reference exited with {result.returncode}: "
                           f"{output[-2000:]}{result.stderr.decode()[-2000:]}")
    return _PRED_PIECE.findall(output)


def run_perplexity(binary: Path, model: Path, tokenizer: Path, prompt: str, buffer_float_type: str,
                   nthreads: int = 1, timeout: float = 600) -> tuple[int, list[float]]:
    """(the number of tokens it encoded the prompt to, the probability it gave each token after the first).
    Its perplexity mode evaluates one position at a time and prints each probability with six decimals."""
    result = subprocess.run(
        [str(binary), "perplexity", "--model", str(model), "--tokenizer", str(tokenizer), "--prompt", prompt,
         "--buffer-float-type", buffer_float_type, "--nthreads", str(nthreads), "--max-seq-len", "256"],
        capture_output=True, timeout=timeout)
    output = result.stdout.decode("utf-8", errors="replace")
    counted = re.search(r"Evaluating (\d+) tokens", output)
    if result.returncode != 0 or counted is None:
        raise RuntimeError(f"the reference exited with {result.returncode}: "
                           f"{output[-2000:]}{result.stderr.decode()[-2000:]}")
    return int(counted.group(1)), [float(p) for p in re.findall(r"prob=([0-9.]+)", output)]


def build_encoder() -> Path:
    """A program that encodes with the reference binary's tokenizer.o (built beside it, once per source)."""
    folder = build_reference().parent
    digest = hashlib.sha256(ENCODER_SOURCE.read_bytes()).hexdigest()[:12]
    program = folder / f"reference-tokenize-{digest}"
    if not program.is_file():
        partial = folder / f".{program.name}.partial"
        subprocess.run(["g++", "-std=c++11", "-O2", "-I", str(folder / "src"), str(ENCODER_SOURCE),
                        *(str(folder / o) for o in _ENCODER_OBJECTS), "-lpthread", "-o", str(partial)],
                       check=True, capture_output=True)
        os.replace(partial, program)
    return program


def reference_encode(encoder: Path, tokenizer: Path, texts: list[str]) -> list[list[int]]:
    """The ids the reference gives each text (as its inference mode encodes a prompt: bos as the .t says)."""
    records = b"".join(struct.pack("<I", len(data)) + data for data in (t.encode("utf-8") for t in texts))
    result = subprocess.run([str(encoder), str(tokenizer)], input=records, capture_output=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the reference encoder exited with {result.returncode}: {result.stderr.decode()[-2000:]}")
    lines = [line for line in result.stdout.decode().splitlines() if line.startswith("ids:")]
    return [[int(i) for i in line[len("ids:"):].split()] for line in lines]
