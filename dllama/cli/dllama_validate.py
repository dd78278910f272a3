"""`dllama-validate`: will this `.m` / `.t` pair produce what the original model would?

    dllama-validate [check] MODEL [TOKENIZER.t] [--hf SOURCE] [--reference REF.npz] [--json]
    dllama-validate reference --hf SOURCE --out REF.npz [--arithmetic q40,q80]

MODEL is what dllama-run takes (a .m, a stored name, a hub id, a GGUF file or a checkpoint folder:
a source is converted into the model store first and is then the default --hf).

Verdict table (or JSON) on stdout, progress on stderr. Exit codes: 0 every check passed,
1 a check failed, 2 usage error or unreadable input (docs/VALIDATE.md).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from dllama.cli import options
from dllama.cli.command_group import VERSION, new_app
from dllama.cli.default_command import DefaultCommandGroup
from dllama.cli.edge import edge, note
from dllama.formats import FloatType
from dllama.validate.reference import ARITHMETIC_TYPES, DEFAULT_MAX_TOKENS, DEFAULT_PROMPTS
from dllama.validate.report import InputError

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# `check` is the default: `dllama-validate MODEL.m TOKENIZER.t` runs it
app = new_app(cls=DefaultCommandGroup,
              help="Will this converted model produce what the original model would? `check` (the default "
                   "command: dllama-validate MODEL [TOKENIZER.t]) prints a verdict table or JSON; `reference` "
                   "computes the original's runs for checking elsewhere. Exit codes: 0 every check passed, 1 a check "
                   "failed, 2 usage error or unreadable input (docs/VALIDATE.md).")


@app.callback()
def _options(version: bool = VERSION) -> None:
    pass


class StderrProgress:
    """One line per stage on stderr, redrawn in place on a terminal; silent with --quiet."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.stage: str | None = None
        self.started = time.monotonic()
        self.last_draw = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if stage != self.stage:
            self._finish()
            self.stage = stage  # timed from the previous stage's end: its first update comes late
        if self.tty and (done >= total or now - self.last_draw > 0.1):
            width = 30
            filled = int(width * done / max(total, 1))
            sys.stderr.write(f"\r{stage:<30} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
            sys.stderr.flush()
            self.last_draw = now

    def _finish(self) -> None:
        if self.stage is not None:
            elapsed = time.monotonic() - self.started
            sys.stderr.write(("\r" if self.tty else "") + f"{self.stage:<30} done in {elapsed:.1f}s" + " " * 30 + "\n")
            sys.stderr.flush()
            self.started = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self._finish()
            self.stage = None


def check_command(
    model: str = typer.Argument(..., metavar="MODEL", help=options.SOURCE_HELP, autocompletion=options.complete_model),
    tokenizer: Optional[Path] = typer.Argument(None, metavar="TOKENIZER.t",
                                               help="the converted tokenizer (default: the .t beside the .m, or the "
                                                    "stored model's)"),
    hf: Optional[str] = typer.Option(None, "--hf", help="the original: a Hugging Face folder, repo id or GGUF file "
                                                        "(default: MODEL, when MODEL is one)"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="REF.npz from `dllama-validate reference`"),
    json_output: bool = typer.Option(False, "--json", help="print the report as JSON (docs/VALIDATE.md)"),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS,
                                   help="tokens per logit prompt when computing the reference here"),
    corpus_limit: Optional[int] = typer.Option(None, help="tokenizer fidelity on the first N corpus texts only"),
    threads: Optional[int] = options.NTHREADS,
    quant: Optional[str] = options.QUANT,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress on stderr"),
) -> None:
    """Check MODEL (and TOKENIZER.t) against the original model (the default command).

    \b
    Example: dllama-validate tinyllama_q40.m tinyllama.t --hf TinyLlama/TinyLlama-1.1B-Chat-v1.0
    Example: dllama-validate HuggingFaceTB/SmolLM2-135M-Instruct   (converted once, checked against the original)

    Without the original here: dllama-validate reference --hf SOURCE --out REF.npz (see its --help),
    then --reference REF.npz.
    """
    from dllama.validate.validator import Options, validate

    progress = StderrProgress(enabled=not quiet)
    with edge(EXIT_USAGE):
        files, hf = _model_files(model, tokenizer, quant, hf)
        try:
            report = validate(files.model, files.tokenizer, hf=hf, reference=reference, progress=progress,
                              options=Options(max_tokens=max_tokens, corpus_limit=corpus_limit, nthreads=threads))
        finally:
            progress.close()
    typer.echo(report.json_text() if json_output else report.table())
    raise typer.Exit(EXIT_PASS if report.ok else EXIT_FAIL)


def _model_files(model: str, tokenizer: Optional[Path], quant: Optional[str], hf: Optional[str]):
    """MODEL as dllama-run resolves it; a source (not a .m, not a stored name) is also the default original."""
    from dllama import store

    files = store.resolve(model, quant, tokenizer, log=note)
    converted_here = files.entry is not None and store.find(model, quant) is None
    return files, hf if hf is not None or not converted_here else model


def reference_command(
    hf: str = typer.Option(..., "--hf", help="the original: a Hugging Face folder, repo id or GGUF file"),
    out: Path = typer.Option(..., "--out", help="where to write REF.npz"),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt",
                                               help="a prompt (repeatable); default: built-in prompts"),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, help="tokens per prompt, bos included"),
    arithmetic: str = typer.Option("q40,q80", help="also a run with these file types' arithmetic, for "
                                                   "logits.correctness ('' for none)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress on stderr"),
) -> None:
    """Compute the original model's reference runs, for validating elsewhere without it.

    Example: dllama-validate reference --hf TinyLlama/TinyLlama-1.1B-Chat-v1.0 --out tinyllama_ref.npz
    """
    from dllama.validate.validator import make_reference, open_original

    progress = StderrProgress(enabled=not quiet)
    prompts = list(prompt) if prompt else list(DEFAULT_PROMPTS)
    with edge(EXIT_USAGE):
        try:
            types = _arithmetic_types(arithmetic)
            original = open_original(hf)
            if original.tokenizer is None or original.tokenizer_file is None:
                raise InputError(f"{original.where} has no usable tokenizer to tokenize the prompts")
            ref = make_reference(original, original.tokenizer_file, prompts, max_tokens, types,
                                 lambda d, t: progress("reference runs", d, t))
            ref.save(out)
        finally:
            progress.close()
    extra = f", arithmetic: {', '.join(ref.traces)}" if ref.traces else ""
    typer.echo(f"wrote {out}: {len(ref.ids)} prompts, {sum(len(i) for i in ref.ids)} positions, vocab "
               f"{ref.vocab_size}{extra}")


def _arithmetic_types(arithmetic: str) -> list[FloatType]:
    types = [FloatType.parse(r.strip()) for r in arithmetic.split(",") if r.strip()]
    if any(t not in ARITHMETIC_TYPES for t in types):
        raise InputError(f"--arithmetic {arithmetic}: only q40 and q80 files have their own arithmetic (f32 is exact)")
    return types


app.command("check")(check_command)  # the default: the first command registered
app.command("reference")(reference_command)


def main(argv: list[str] | None = None) -> None:
    app(argv, prog_name="dllama-validate")


if __name__ == "__main__":
    main()
