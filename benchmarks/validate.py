"""Benchmark: `dllama-validate` on a TinyLlama-1.1B-shaped q40 model with default settings.

Target (issue 5): under 60 s on 2 cores, with the original checkpoint given (--hf), progress on
stderr. Builds a random bf16 TinyLlama-shaped checkpoint with the Llama 2 tokenizer fixture
(2.2 GB, cached in .bench/validate), converts it to q40 once, then times the CLI as a user runs
it: `--hf` (reference logits computed here) and `--reference REF.npz` (precomputed elsewhere).

    python benchmarks/validate.py [--workdir .bench/validate] [--threads N]
    python benchmarks/validate.py thresholds     # the logit metrics behind LOGIT_THRESHOLDS

`thresholds` runs our runtime on every conformance fixture conversion, correct and with each
classic bug (rows not permuted, wrong rope_theta, w1/w3 swapped, wo of layers 0/1 swapped),
against the fixtures' transformers logits, and prints the metrics of docs/VALIDATE.md.

Results go to docs/BENCHMARKS.md ("## Validation").
"""
from __future__ import annotations

import sys


import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "tokenizers" / "llama2"
TARGET_SECONDS = 60.0


def prepare(workdir: Path, tokenizer_dir: Path = LLAMA2_TOKENIZER) -> tuple[Path, Path, Path]:
    from dllama.converter.convert import convert
    from dllama.converter.synthetic import tinyllama_config, write_checkpoint

    source = workdir / "tinyllama-hf"
    out = workdir / "converted"
    if not (source / "config.json").is_file():
        print(f"writing a TinyLlama-shaped bf16 checkpoint to {source} ...", file=sys.stderr)
        write_checkpoint(source, tinyllama_config(), dtype="bf16", seed=0, tokenizer=tokenizer_dir)
    models = list(out.glob("*_q40.m"))
    if not models:
        print("converting it to q40 ...", file=sys.stderr)
        convert(source, "q40", out, name="tinyllama")
        models = list(out.glob("*_q40.m"))
    return source, models[0], next(out.glob("*.t"))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    return time.perf_counter() - start, proc.returncode, proc.stdout


FIXTURES = ROOT.parent / "shared" / "fixtures" / "conformance"


def mutations(model: Path, workdir: Path) -> dict[str, Path]:
    """The correct file and one file per classic bug, made by editing its bytes."""
    from dataclasses import replace

    import numpy as np

    from dllama.formats import ArchType, ModelFile

    mf = ModelFile(model)
    h = mf.header
    original = model.read_bytes()

    def span(name: str) -> slice:
        t = mf.layout[name]
        return slice(t.offset, t.offset + t.spec.nbytes)

    def swapped(a: str, b: str) -> bytes:
        data = bytearray(original)
        data[span(a)], data[span(b)] = original[span(b)], original[span(a)]
        return bytes(data)

    variants = {"correct": original,
                "rope_theta x100" if h.theta < 1e5 else "rope_theta 10000":
                    replace(h, rope_theta=int(h.theta * 100) if h.theta < 1e5 else 10000).to_bytes() + original[h.nbytes:],
                "w1/w3 swapped (layer 1)": swapped("layers.1.w1", "layers.1.w3"),
                "wo of layers 0/1 swapped": swapped("layers.0.wo", "layers.1.wo")}
    if h.arch == ArchType.LLAMA:
        data = bytearray(original)
        for layer in range(h.n_layers):
            for name, heads in ((f"layers.{layer}.q", h.n_heads), (f"layers.{layer}.k", h.n_kv_heads)):
                rows = np.frombuffer(original[span(name)], np.uint8).reshape(mf.layout[name].spec.shape[0], -1)
                order = np.arange(len(rows)).reshape(heads, -1, 2).swapaxes(1, 2).reshape(-1)
                data[span(name)] = rows[order].tobytes()
        variants["q/k not permuted"] = bytes(data)
    paths = {}
    for label, data in variants.items():
        path = workdir / f"{model.stem}_{len(paths)}.m"
        path.write_bytes(data)
        paths[label] = path
    return paths


def thresholds(workdir: Path) -> None:
    import numpy as np

    from dllama.checkpoint import Checkpoint
    from dllama.formats import FloatType
    from dllama.runtime.engine import Engine
    from dllama.validate.fidelity import compare_logits
    from dllama.validate.reference import ReferenceLogits, ReferenceModel

    def summary(ours: list, reference: list) -> str:
        metrics = [compare_logits(got, want) for got, want in zip(ours, reference)]
        kl = np.concatenate([m["kl"] for m in metrics])
        top1 = sum(m["top1"] * m["positions"] for m in metrics) / len(kl)
        return f"{top1:.3f} | {kl.mean():.2g} | {np.percentile(kl, 99):.2g} | {max(m['max_abs'] for m in metrics):.3g}"

    print("| fixture | weights | variant | vs original: top1 | mean KL | p99 KL | max abs (rel) "
          "| vs rounded original: top1 | mean KL | p99 KL | max abs (rel) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for fixture in sorted(FIXTURES.iterdir()):
        ref = ReferenceLogits.load(fixture / "reference_logits.npz")
        for quant in ("f32", "q80", "q40"):
            rounded = (ReferenceModel(Checkpoint(fixture), FloatType.parse(quant)).logits(ref.ids)
                       if quant != "f32" else None)
            for label, path in mutations(fixture / f"expected_{quant}.m", workdir).items():
                engine = Engine.load(path, max_seq_len=max(len(i) for i in ref.ids))
                ours = []
                for ids in ref.ids:
                    engine.reset()
                    ours.append(engine.forward([int(i) for i in ids], 0))
                vs_rounded = summary(ours, rounded) if rounded else "- | - | - | -"
                print(f"| {fixture.name} | {quant} | {label} | {summary(ours, ref.logits)} | {vs_rounded} |")


def main() -> None:
    if sys.argv[1:2] == ["thresholds"]:
        workdir = ROOT / ".bench" / "validate" / "mutations"
        workdir.mkdir(parents=True, exist_ok=True)
        return thresholds(workdir)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "validate")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokenizer-dir", type=Path, default=LLAMA2_TOKENIZER, help="the Llama 2 tokenizer fixture folder")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source, model, tokenizer = prepare(args.workdir, args.tokenizer_dir)
    cli = [sys.executable, "-m", "dllama.validate.cli"]
    extra = ["--threads", str(args.threads)] if args.threads else []
    ref = args.workdir / "tinyllama_ref.npz"

    rows = []
    seconds, code, _ = timed(cli + ["reference", "--hf", str(source), "--out", str(ref)])
    rows.append(("dllama-validate reference --hf SOURCE --out REF.npz", "", seconds, code))
    with tempfile.TemporaryDirectory() as fresh_cache:  # the first run builds the compiled kernels
        for label, env in (("first run: compiles the runtime kernels for this CPU", dict(os.environ, DLLAMA_CACHE=fresh_cache)),
                           ("second run", None)):
            seconds, code, table = timed(cli + [str(model), str(tokenizer), "--hf", str(source)] + extra, env)
            rows.append(("dllama-validate MODEL.m TOKENIZER.t --hf SOURCE", label, seconds, code))
    print(table)
    seconds, code, _ = timed(cli + [str(model), str(tokenizer), "--reference", str(ref)] + extra)
    rows.append(("dllama-validate MODEL.m TOKENIZER.t --reference REF.npz", "", seconds, code))

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"model: {model.name} ({model.stat().st_size / 1e6:.0f} MB)")
    print("| command | note | seconds | exit code |\n|---|---|---|---|")
    for name, note, seconds, code in rows:
        print(f"| `{name}` | {note} | {seconds:.1f} | {code} |")
    main_run = rows[2][2]
    print(f"target: --hf run under {TARGET_SECONDS:.0f} s: {'met' if main_run < TARGET_SECONDS else 'NOT met'} ({main_run:.1f} s)")


if __name__ == "__main__":
    main()
