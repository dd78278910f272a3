"""Conversion speed and memory: a TinyLlama-1.1B-shaped bf16 checkpoint (~2.2 GB) -> q40, or SmolLM2.

    python benchmarks/convert.py [--runs 3] [--quant q40] [--cold]
    python benchmarks/convert.py --source smollm2-gguf    # SmolLM2-135M's GGUF (Q4_1, 98 MB): dllama-convert gguf
    python benchmarks/convert.py --source smollm2-hf      # the f32 folder transformers saves from it: dllama-convert hf
    python benchmarks/convert.py --encoder both --runs 3   # q40: --exact and the error-aware encoder, alternating

Builds the checkpoint once under .bench/ (ignored by git) and reuses it. Each run is a fresh
child process running `dllama-convert hf` exactly as a user would; wall time is measured
around it and peak RSS is the child's ru_maxrss. The numba kernels are compiled (or loaded
from their cache) in a warm-up conversion of a tiny model first, as after any first use.
Target: <= 10 s wall and <= 400 MB peak RSS on 2 cores; the error-aware q40 encoder (calibration
included) <= 3x the exact one's time, <= 400 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
CHECKPOINT = BENCH / "tinyllama-bf16"
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "tokenizers" / "llama2"  # TinyLlama's tokenizer
EXAMPLE_TOKENIZER = ROOT / "examples" / "tokenizer"


def ensure_checkpoint() -> Path:
    from dllama.converter.synthetic import tinyllama_config, write_checkpoint

    config = tinyllama_config()
    marker = CHECKPOINT / "config.json"
    has_tokenizer = any((CHECKPOINT / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    if marker.is_file() and json.loads(marker.read_text()) | {"torch_dtype": "bfloat16"} == config and has_tokenizer:
        return CHECKPOINT
    tokenizer = LLAMA2_TOKENIZER if LLAMA2_TOKENIZER.is_dir() else EXAMPLE_TOKENIZER
    print(f"building {CHECKPOINT} (once) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    write_checkpoint(CHECKPOINT, config, dtype="bf16", seed=0, tokenizer=tokenizer)
    print(f"  built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return CHECKPOINT


def smollm2_gguf() -> Path:
    from dllama.samples import fetch

    return fetch(quiet=True)


def smollm2_hf() -> Path:
    """The float32 Hugging Face folder transformers saves from SmolLM2's GGUF (built once under .bench/)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_helpers import hf_folder_from_gguf

    folder = BENCH / "smollm2-hf"
    if not (folder / "model.safetensors").is_file():
        print(f"building {folder} (once) ...", file=sys.stderr, flush=True)
        hf_folder_from_gguf(smollm2_gguf(), folder, ROOT.parent / "shared" / "fixtures" / "smollm2")
    return folder


SOURCES = {"tinyllama": ensure_checkpoint, "smollm2-gguf": smollm2_gguf, "smollm2-hf": smollm2_hf}


def convert_in_child(source: Path, quant: str, out: Path, exact: bool = False) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one `dllama-convert hf|gguf` in a fresh process."""
    command = "gguf" if source.is_file() else "hf"
    cmd = [sys.executable, "-m", "dllama.cli.dllama_convert", command, str(source), "--quant", quant, "--name", "bench",
           "--output-dir", str(out)] + (["--exact"] if exact else [])
    log = BENCH / "convert.log"
    with open(log, "w") as stdout:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: ru_maxrss in KB on Linux
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"conversion failed: {log.read_text().strip()}")
    return wall, usage.ru_maxrss * 1024, log.read_text()


def evict_from_page_cache(folder: Path) -> None:
    """Drop only these files' cached pages (POSIX_FADV_DONTNEED), for a cold-read run without touching others'."""
    for path in [folder] if folder.is_file() else folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_up(out: Path) -> None:
    from dllama.converter.synthetic import tiny_config, write_checkpoint

    tiny = write_checkpoint(BENCH / "warmup", tiny_config(vocab_size=512, bos_token_id=510, eos_token_id=511),
                            tokenizer=EXAMPLE_TOKENIZER)
    for quant in ("q40", "q80", "f32"):
        subprocess.run([sys.executable, "-m", "dllama.cli.dllama_convert", "hf", str(tiny), "-q", quant, "-o",
                        str(out)],
                       check=True, capture_output=True)


def spot_check(model_path: Path, source: Path) -> None:
    """The benchmark's output is a correct file: exact size, and layer 0 / lm_head equal the numpy codec."""
    from dllama.checkpoint import Checkpoint
    from dllama.formats import ModelFile, encode_tensor, model_file_size, permute_rotary_rows

    model = ModelFile(model_path)
    assert model_path.stat().st_size == model_file_size(model.header)
    ck = Checkpoint(source)
    for name, hf, heads in (("layers.0.q", "model.layers.0.self_attn.q_proj.weight", model.header.n_heads),
                            ("layers.21.w2", "model.layers.21.mlp.down_proj.weight", None),
                            ("lm_head", "lm_head.weight", None)):
        w = ck.get(hf)
        if heads:
            w = permute_rotary_rows(w, heads)
        spec = model.layout[name].spec
        assert np.array_equal(model.raw(name), encode_tensor(w, spec.float_type)), name


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        names = (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
        model = next(names, "?")
    except OSError:
        model = platform.processor() or "?"
    return (f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quant", default="q40")
    parser.add_argument("--cold", action="store_true", help="evict the source from the page cache before each run")
    parser.add_argument("--source", choices=sorted(SOURCES), default="tinyllama")
    parser.add_argument("--encoder", choices=("exact", "error-aware", "both"), default="exact",
                        help="q40's encoder: --exact (the reference's bytes), the default error-aware one, or both "
                             "alternating (paired runs, their ratio)")
    args = parser.parse_args()
    source = SOURCES[args.source]()
    out = BENCH / "out"
    warm_up(out)
    source_bytes = (source.stat().st_size if source.is_file()
                    else sum(f.stat().st_size for f in source.glob("*.safetensors")))
    print(f"machine: {machine()}; load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"source: {source} ({source_bytes / 1e9:.2f} GB, {'evicted from' if args.cold else 'in'} the page cache), "
          f"target {args.quant}")
    encoders = {"exact": [True], "error-aware": [False], "both": [True, False]}[args.encoder]
    walls, peaks = {e: [] for e in encoders}, {e: [] for e in encoders}
    for i in range(args.runs):
        for exact in encoders:
            if args.cold:
                evict_from_page_cache(source)
            wall, peak, stdout = convert_in_child(source, args.quant, out, exact)
            walls[exact].append(wall)
            peaks[exact].append(peak)
            name = "exact" if exact else "error-aware"
            print(f"run {i + 1} ({name}): {wall:.2f} s wall, peak RSS {peak / 1e6:.0f} MB")
        if args.source == "tinyllama" and encoders[-1]:
            spot_check(out / f"dllama_model_bench_{args.quant}.m", source)
    model_path = out / f"dllama_model_bench_{args.quant}.m"
    if len(encoders) == 2:
        ratio = statistics.median(walls[False]) / statistics.median(walls[True])
        print(f"error-aware / exact: {ratio:.2f}x the time (medians {statistics.median(walls[False]):.2f} / "
              f"{statistics.median(walls[True]):.2f} s), peak RSS {max(peaks[False]) / 1e6:.0f} / "
              f"{max(peaks[True]) / 1e6:.0f} MB; per pair: "
              + ", ".join(f"{a / b:.2f}" for a, b in zip(walls[False], walls[True])))
    walls, peaks = walls[encoders[-1]], peaks[encoders[-1]]
    print(f"result: median {statistics.median(walls):.2f} s (min {min(walls):.2f}), "
          f"{source_bytes / 1e9 / statistics.median(walls):.2f} GB/s of source, peak RSS {max(peaks) / 1e6:.0f} MB, "
          f"output {model_path.stat().st_size / 1e9:.3f} GB"
          + ("; spot check vs numpy codec: identical" if args.source == "tinyllama" and encoders[-1] else ""))


if __name__ == "__main__":
    main()
