"""Benchmark: `dllama-validate` on a TinyLlama-1.1B-shaped q40 model with default settings.

Target: under 60 s on 2 cores, with the original checkpoint given (--hf), progress on
stderr. Builds a random bf16 TinyLlama-shaped checkpoint with the Llama 2 tokenizer fixture
(2.2 GB, cached in .bench/validate), converts it to q40 once, then times the CLI as a user runs
it: `--hf` (reference logits computed here) and `--reference REF.npz` (precomputed elsewhere).

    python benchmarks/validate.py [--workdir .bench/validate] [--threads N]
    python benchmarks/validate.py thresholds     # the metrics behind logits.correctness's limits
    python benchmarks/validate.py smollm2        # SmolLM2 q40 --hf timed (< 30 s), one-node KL before/after

`thresholds` validates every conformance fixture conversion, correct and with each classic bug
(rows not permuted, wrong rope_theta, w1/w3 swapped, wo of layers 0/1 swapped), against a
REF.npz with the q40/q80 arithmetic runs, and prints the metrics of docs/VALIDATE.md.

Results go to docs/BENCHMARKS.md ("## Validation").
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
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
SMOLLM2_GGUF = Path.home() / ".cache" / "dllama" / "samples" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_TARGET_SECONDS = 30.0


def fixture_mutations() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from validate_helpers import swap_tensors, unpermute_qk

    return {"correct": None, "q/k not permuted": unpermute_qk,
            "rope_theta x100 (10000 for qwen3)": None,  # fixture-dependent, see rope_mutation
            "w1/w3 swapped (layer 1)": swap_tensors("layers.1.w1", "layers.1.w3"),
            "wo of layers 0/1 swapped": swap_tensors("layers.0.wo", "layers.1.wo")}


def rope_mutation(fixture: Path):
    """rope_theta x100 where the fixture has the 10000 default (tiny-llama), else the classic
    bug of writing the 10000 default (tiny-qwen3's 1e6)."""
    from validate_helpers import set_header

    from dllama.formats import read_model_header

    theta = read_model_header(fixture / "expected_f32.m").theta
    return set_header(rope_theta=int(theta * 100) if theta <= 10000 else 10000)


def thresholds(workdir: Path) -> None:
    """logits.correctness and logits.quality of every fixture conversion, correct and mutated,
    against a REF.npz with the q40/q80 arithmetic runs (the numbers of docs/VALIDATE.md)."""
    from dllama.checkpoint import Checkpoint
    from dllama.formats import FloatType
    from dllama.validate.reference import ReferenceLogits, compute_reference
    from dllama.validate.validator import Options, validate
    mutations = fixture_mutations()
    from validate_helpers import write_model_with
    print("| fixture | weights | variant | logits.correctness | measured | logits.quality |\n|---|---|---|---|---|---|")
    for fixture in sorted(FIXTURES.iterdir()):
        ids = ReferenceLogits.load(fixture / "reference_logits.npz").ids
        ref_path = workdir / f"{fixture.name}_ref.npz"
        compute_reference(Checkpoint(fixture), ids, arithmetics=[FloatType.Q40, FloatType.Q80]).save(ref_path)
        for quant in ("f32", "q80", "q40"):
            for label, edit in mutations.items():
                if label == "q/k not permuted" and "qwen3" in fixture.name:
                    continue  # qwen3 is not permuted
                edit = rope_mutation(fixture) if label.startswith("rope_theta") else edit
                path = fixture / f"expected_{quant}.m"
                if edit is not None:
                    path = write_model_with(workdir / "mutated.m", path, edit)
                report = validate(path, fixture / "expected.t", reference=ref_path, options=Options(corpus_limit=1))
                c, q = report.get("logits.correctness"), report.get("logits.quality")
                print(f"| {fixture.name} | {quant} | {label} | {c.status.value} | {c.measured} | {q.measured} |")


def smollm2(workdir: Path) -> None:
    """Must-hold 4 (SmolLM2 q40 with --hf, timed) and issue 12 item 4 (KL of one node with and
    without the q80 round trip of partials), on SmolLM2 converted from its GGUF."""
    from dllama.converter.convert import convert
    from dllama.runtime.engine import Engine
    from dllama.validate.logits import LogitStats
    from dllama.validate.reference import DEFAULT_PROMPTS
    from dllama.validate.validator import make_reference, open_original

    out = workdir / "smollm2"
    if not list(out.glob("*_q40.m")):
        for quant in ("q80", "q40"):
            convert(SMOLLM2_GGUF, quant, out, name="smollm2")
    tokenizer = next(out.glob("*.t"))
    cli = [sys.executable, "-m", "dllama.cli.dllama_validate"]
    seconds, code, table = timed(cli + [str(out / "dllama_model_smollm2_q40.m"), str(tokenizer), "--hf",
                                        str(SMOLLM2_GGUF)])
    print(table)
    print(f"dllama-validate SmolLM2 q40 --hf GGUF: {seconds:.1f} s, exit {code} "
          f"(target {SMOLLM2_TARGET_SECONDS:.0f} s: {'met' if seconds < SMOLLM2_TARGET_SECONDS else 'NOT met'})")
    original = open_original(SMOLLM2_GGUF)
    ref = make_reference(original, original.tokenizer_file, DEFAULT_PROMPTS, 24, [], None)
    print("| weights | one node, partials | top1 | mean KL | p99 KL |\n|---|---|---|---|---|")
    for quant in ("q80", "q40"):
        for buffers, label in (("q80", "rounded through q80 (before)"), (None, "float32 (now)")):
            engine = Engine.load(out / f"dllama_model_smollm2_{quant}.m", max_seq_len=256, buffer_float_type=buffers)
            ours = []
            for ids in ref.ids:
                engine.reset()
                ours.append(engine.forward([int(i) for i in ids], 0))
            s = LogitStats.of(ours, ref.logits)
            print(f"| {quant} | {label} | {s.top1:.3f} | {s.mean_kl:.3g} | {s.p99_kl:.3g} |")


def main() -> None:
    if sys.argv[1:2] in (["thresholds"], ["smollm2"]):
        workdir = ROOT / ".bench" / "validate" / sys.argv[1]
        workdir.mkdir(parents=True, exist_ok=True)
        return thresholds(workdir) if sys.argv[1] == "thresholds" else smollm2(workdir)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "validate")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokenizer-dir", type=Path, default=LLAMA2_TOKENIZER,
                        help="the Llama 2 tokenizer fixture folder")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source, model, tokenizer = prepare(args.workdir, args.tokenizer_dir)
    cli = [sys.executable, "-m", "dllama.cli.dllama_validate"]
    extra = ["--threads", str(args.threads)] if args.threads else []
    ref = args.workdir / "tinyllama_ref.npz"

    rows = []
    seconds, code, _ = timed(cli + ["reference", "--hf", str(source), "--out", str(ref)])
    rows.append(("dllama-validate reference --hf SOURCE --out REF.npz", "", seconds, code))
    with tempfile.TemporaryDirectory() as fresh_cache:  # the first run builds the compiled kernels
        for label, env in (("first run: compiles the runtime kernels for this CPU", dict(os.environ,
                                                                                         DLLAMA_CACHE=fresh_cache)),
                           ("second run", None)):
            seconds, code, table = timed(cli + [str(model), str(tokenizer), "--hf", str(source)] + extra, env)
            rows.append(("dllama-validate MODEL.m TOKENIZER.t --hf SOURCE", label, seconds, code))
    print(table)
    seconds, code, _ = timed(cli + [str(model), str(tokenizer), "--reference", str(ref)] + extra)
    rows.append(("dllama-validate MODEL.m TOKENIZER.t --reference REF.npz", "", seconds, code))

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    print(f"model: {model.name} ({model.stat().st_size / 1e6:.0f} MB)")
    print("| command | note | seconds | exit code |\n|---|---|---|---|")
    for name, note, seconds, code in rows:
        print(f"| `{name}` | {note} | {seconds:.1f} | {code} |")
    main_run = rows[2][2]
    print(f"target: --hf run under {TARGET_SECONDS:.0f} s: {'met' if main_run < TARGET_SECONDS else 'NOT met'} "
          f"({main_run:.1f} s)")


if __name__ == "__main__":
    main()
