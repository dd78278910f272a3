"""`dllama-convert`: Hugging Face checkpoint or tokenizer -> distributed-llama `.m` / `.t`.

Progress goes to stderr, the summary to stdout; every expected failure is one line on stderr
and exit code 1, with no output file left behind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn, Optional

import typer

from dllama.cli.command_group import VERSION, new_app
from dllama.cli.edge import edge, fail, note, terminations_interrupt
from dllama.converter.convert import ConversionJob, ConversionResult, default_name, prepare_conversion, write_outputs
from dllama.converter.hub import resolve_source
from dllama.formats import FloatType

app = new_app(no_args_is_help=True,
              help="Convert Hugging Face checkpoints and GGUF files to the distributed-llama format (.m model, "
                   ".t tokenizer).")
PROGRESS_MIN_BYTES = 64 << 20  # below this a conversion is too quick for a progress bar
QUANTS = ("q40", "q80", "f32")
# the format has f16 weights, but neither dllama-run nor the reference runtime runs them (runtime/tensors.py)
UNRUNNABLE = {"f16": "no runtime runs f16 weights (dllama-run and the reference runtime refuse them); use f32 for "
                     "full precision, or q80 (half its size, nearly the same answers)"}


# options every command shares
QUANT = typer.Option(..., "--quant", "-q", help="weight type: q40, q80 or f32")
NAME = typer.Option(None, "--name", "-n", help="model name in the output file names (default: the source's)")
OUTPUT_DIR = typer.Option(Path("."), "--output-dir", "-o", help="folder for the output files")
EMBED = typer.Option(True, "--embed-tokenizer/--no-embed-tokenizer",
                     help="embed the source tokenizer after the .t vocabulary (docs/FORMAT.md)")
REVISION = typer.Option(None, "--revision", help="hub revision (branch, tag or commit)")
AS_JSON = typer.Option(False, "--json", help="print the summary as JSON")
EXACT = typer.Option(False, "--exact", help="q40 byte-identical to the reference converter (scale = absmax / -8) "
                                            "instead of the error-aware encoder (docs/VALIDATE.md)")
CALIBRATION = typer.Option(None, "--calibration", help="text file the error-aware q40 encoder measures the model's "
                                                       "activations on (default: a built-in English text)")


@app.callback()
def _options(version: bool = VERSION) -> None:
    pass


@app.command("hf")
def hf(
    source: str = typer.Argument(..., help="checkpoint folder, or a hub repo id (org/name) to download"),
    quant: str = QUANT, name: Optional[str] = NAME, output_dir: Path = OUTPUT_DIR, embed_tokenizer: bool = EMBED,
    revision: Optional[str] = REVISION, as_json: bool = AS_JSON, exact: bool = EXACT,
    calibration: Optional[Path] = CALIBRATION,
) -> None:
    """Convert a model: writes dllama_model_{name}_{quant}.m and dllama_tokenizer_{name}.t.

    Example: dllama-convert hf TinyLlama/TinyLlama-1.1B-Chat-v1.0 --quant q40 --output-dir models/
    """
    if Path(source).expanduser().is_file():
        fail(f"{source} is a file; for a GGUF file use `dllama-convert gguf {source}`")
    _run(source, _float_type(quant), name, output_dir, embed_tokenizer, revision, as_json, exact, calibration)


@app.command("gguf")
def gguf(
    source: Path = typer.Argument(..., help="a llama.cpp GGUF model file (llama, mistral, qwen3, qwen3moe); "
                                            "Q4_0 -> q40 and Q8_0 -> q80 copy the blocks as they are"),
    quant: str = QUANT, name: Optional[str] = NAME, output_dir: Path = OUTPUT_DIR, embed_tokenizer: bool = EMBED,
    as_json: bool = AS_JSON, exact: bool = EXACT, calibration: Optional[Path] = CALIBRATION,
) -> None:
    """Convert a GGUF file: writes dllama_model_{name}_{quant}.m and dllama_tokenizer_{name}.t.

    Example: dllama-convert gguf SmolLM2-135M-Instruct.Q4_1.gguf --quant q40 --output-dir models/
    """
    if not source.is_file():
        fail(f"{source} is not a file; `dllama-convert gguf` takes a .gguf file (use `dllama-convert hf` for a folder)")
    _run(str(source), _float_type(quant), name, output_dir, embed_tokenizer, None, as_json, exact, calibration)


@app.command("tokenizer")
def tokenizer(
    source: str = typer.Argument(...,
                                 help="folder with tokenizer.json or tokenizer.model, a hub repo id, or a GGUF file"),
    name: Optional[str] = NAME, output_dir: Path = OUTPUT_DIR, embed_tokenizer: bool = EMBED,
    revision: Optional[str] = REVISION, as_json: bool = AS_JSON,
) -> None:
    """Convert only the tokenizer: writes dllama_tokenizer_{name}.t.

    Example: dllama-convert tokenizer meta-llama/Llama-3.2-1B --output-dir models/
    """
    _run(source, None, name, output_dir, embed_tokenizer, revision, as_json)


def _float_type(quant: str) -> FloatType:
    if quant.lower() in UNRUNNABLE:
        fail(f"--quant {quant}: {UNRUNNABLE[quant.lower()]}")
    if quant.lower() not in QUANTS:
        fail(f"unknown --quant {quant!r}: use one of {', '.join(QUANTS)}")
    return FloatType.parse(quant)


def _run(source: str, float_type: FloatType | None, name: str | None, output_dir: Path, embed: bool,
         revision: str | None, as_json: bool, exact: bool = False, calibration: Path | None = None) -> None:
    with edge(interrupted=_interrupted), terminations_interrupt():
        local = Path(source).expanduser()
        folder = local if local.is_file() else resolve_source(source, revision)
        name = name or default_name(str(local.resolve()) if local.exists() else source)
        plan = prepare_conversion(folder, float_type, name, output_dir,
                               with_tokenizer=True, embed_tokenizer=embed, exact=exact, calibration_text=calibration)
        for message in plan.notes:
            note(f"note: {message}")
        result = _write_with_progress(plan)
    if as_json:
        typer.echo(json.dumps(summary_dict(result), indent=2))
    else:
        typer.echo(summary_text(result))


def _interrupted() -> NoReturn:
    fail("interrupted; no output was written")


def _write_with_progress(plan: ConversionJob) -> ConversionResult:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    if plan.source_bytes < PROGRESS_MIN_BYTES or not console.is_terminal:
        return write_outputs(plan)
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"converting to {plan.model_path.name}", total=plan.source_bytes)
        return write_outputs(plan, lambda n: progress.advance(task, n))


# --------------------------------------------------------------------------------------------
# Summary

def summary_dict(result: ConversionResult) -> dict:
    plan = result.plan
    out: dict = {"source": str(plan.source), "seconds": round(result.seconds, 3),
                 "outputs": {str(p): size for p, size in result.sizes.items()}}
    h = plan.header
    if h is not None:
        out["model"] = {
            "model_type": plan.config.get("model_type"), "arch": h.arch.name.lower(),
            "quant": h.weights_float_type.name.lower(),
            "dim": h.dim, "hidden_dim": h.hidden_dim, "head_dim": h.head_dim, "n_layers": h.n_layers,
            "n_heads": h.n_heads, "n_kv_heads": h.n_kv_heads, "n_experts": h.n_experts,
            "n_active_experts": h.n_active_experts, "vocab_size": h.vocab_size, "max_seq_len": h.max_seq_len,
            "rope_theta": h.theta, "norm_epsilon": h.norm_epsilon, "source_bytes": plan.source_bytes,
        }
    if plan.tokenizer is not None:
        t = plan.tokenizer
        out["tokenizer"] = {"vocab_size": t.vocab_size, "bos_id": t.bos_id, "eos_ids": t.eos_ids,
                            "chat_template": bool(t.chat_template),
                            "embedded_source": plan.embed_tokenizer and bool(t.embedded)}
    out["notes"] = plan.notes
    return out


def summary_text(result: ConversionResult) -> str:
    plan = result.plan
    lines = []
    h = plan.header
    if h is not None:
        experts = f", {h.n_experts} experts ({h.n_active_experts} active, hidden {h.ffn_dim})" if h.is_moe else ""
        lines += [
            f"model      {plan.config.get('model_type')} (arch {h.arch.name.lower()}), "
            f"{h.weights_float_type.name.lower()} weights",
            f"dims       dim {h.dim}, hidden {h.hidden_dim}, head {h.head_dim} (q {h.q_dim}, kv {h.kv_dim}){experts}",
            f"layers     {h.n_layers}, heads {h.n_heads}, kv heads {h.n_kv_heads}",
            f"vocab      {h.vocab_size}, max seq len {h.max_seq_len}, rope theta {h.theta:g}, norm eps "
            f"{h.norm_epsilon:g}",
            f"source     {plan.source} ({_size(plan.source_bytes)} of tensors)",
        ]
    if plan.tokenizer is not None:
        t = plan.tokenizer
        embedded = "with the source tokenizer embedded" if plan.embed_tokenizer and t.embedded else "no embedded source"
        lines.append(f"tokenizer  {t.vocab_size} tokens, bos {t.bos_id}, eos {t.eos_ids}, "
                     f"{'chat template' if t.chat_template else 'no chat template'}, {embedded}")
    for path, size in result.sizes.items():
        lines.append(f"wrote      {path} ({_size(size)})")
    lines.append(f"time       {result.seconds:.2f} s")
    lines += [f"note       {n}" for n in plan.notes]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
