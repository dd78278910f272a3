"""The reference C++ runtime (distributed-llama, ../shared/reference), built once per machine.

`build_reference()` unpacks the published source tarball outside the tree, into
$DLLAMA_CACHE/reference/<tarball name>/, and runs `make dllama` there (~30 s, needs g++ and
make); later calls reuse the binary. `run_inference` runs it greedily and returns the pieces it
printed, one per predicted token.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from dllama.runtime.aot_kernels import cache_root

SHARED_REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
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
                  nthreads: int = 2, timeout: float = 600) -> list[str]:
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
