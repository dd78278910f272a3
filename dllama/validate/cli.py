"""`dllama-validate`: will this `.m` / `.t` pair produce what the original model would?

    dllama-validate MODEL.m TOKENIZER.t [--hf SOURCE] [--reference REF.npz] [--json]
    dllama-validate reference --hf SOURCE --out REF.npz [--rounded q40,q80]

Verdict table (or JSON) on stdout, progress on stderr. Exit codes: 0 every check passed,
1 a check failed, 2 usage error or unreadable input (docs/VALIDATE.md).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from dllama.formats import FloatType, FormatError
from dllama.validate.reference import DEFAULT_MAX_TOKENS, DEFAULT_PROMPTS, ROUNDABLE
from dllama.validate.report import InputError

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

validate_app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)
reference_app = typer.Typer(add_completion=False, rich_markup_mode=None)


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


def _error(message: str) -> "typer.Exit":
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


@validate_app.command()
def validate_command(
    model: Path = typer.Argument(..., help="the converted model, MODEL.m"),
    tokenizer: Path = typer.Argument(..., help="the converted tokenizer, TOKENIZER.t"),
    hf: Optional[str] = typer.Option(None, "--hf", help="the original Hugging Face folder or repo id"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="REF.npz from `dllama-validate reference`"),
    json_output: bool = typer.Option(False, "--json", help="print the report as JSON (docs/VALIDATE.md)"),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, help="tokens per logit prompt when computing the reference here"),
    corpus_limit: Optional[int] = typer.Option(None, help="tokenizer fidelity on the first N corpus texts only"),
    threads: Optional[int] = typer.Option(None, help="runtime threads (default: all cores)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress on stderr"),
) -> None:
    """Check MODEL.m and TOKENIZER.t against the original model.

    Example: dllama-validate tinyllama_q40.m tinyllama.t --hf TinyLlama/TinyLlama-1.1B-Chat-v1.0
    """
    from dllama.validate.validator import Options, validate

    progress = StderrProgress(enabled=not quiet)
    try:
        report = validate(model, tokenizer, hf=hf, reference=reference, progress=progress,
                          options=Options(max_tokens=max_tokens, corpus_limit=corpus_limit, nthreads=threads))
    except (InputError, FormatError) as e:
        raise _error(str(e))
    finally:
        progress.close()
    typer.echo(report.json_text() if json_output else report.table())
    raise typer.Exit(EXIT_PASS if report.ok else EXIT_FAIL)


@reference_app.command()
def reference_command(
    hf: str = typer.Option(..., "--hf", help="the original Hugging Face folder or repo id"),
    out: Path = typer.Option(..., "--out", help="where to write REF.npz"),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="a prompt (repeatable); default: built-in prompts"),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, help="tokens per prompt, bos included"),
    rounded: str = typer.Option("q40,q80", help="also the logits with weights rounded like these file types ('' for none)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress on stderr"),
) -> None:
    """Compute float32 reference logits of the original checkpoint, for validating elsewhere.

    Example: dllama-validate reference --hf TinyLlama/TinyLlama-1.1B-Chat-v1.0 --out tinyllama_ref.npz
    """
    from dllama.tokenizer.convert import TokenizerConversionError, convert_tokenizer
    from dllama.validate.fidelity import SourceTokenizer, reference_prompt_ids
    from dllama.validate.reference import compute_reference
    from dllama.validate.validator import open_checkpoint

    progress = StderrProgress(enabled=not quiet)
    prompts = list(prompt) if prompt else list(DEFAULT_PROMPTS)
    try:
        ckpt = open_checkpoint(hf)
        source = SourceTokenizer.from_folder(ckpt.folder)
        if source is None:
            raise InputError(f"{ckpt.folder} has no tokenizer.json or tokenizer.model to tokenize the prompts")
        tf = convert_tokenizer(ckpt.folder, embed=False)
        ids = reference_prompt_ids(source, tf.bos_id, tf.add_bos, prompts, max_tokens)
        roundings = [FloatType.parse(r) for r in rounded.split(",") if r.strip()]
        if any(r not in ROUNDABLE for r in roundings):
            raise InputError(f"--rounded {rounded}: only q40 and q80 files round their weights")
        ref = compute_reference(ckpt, ids, prompts, roundings=roundings,
                                progress=lambda d, t: progress("reference logits", d, t))
        ref.save(out)
    except (InputError, FormatError, TokenizerConversionError) as e:
        raise _error(str(e))
    finally:
        progress.close()
    extra = f", rounded: {', '.join(ref.rounded)}" if ref.rounded else ""
    typer.echo(f"wrote {out}: {len(ids)} prompts, {sum(len(i) for i in ids)} positions, vocab {ref.vocab_size}{extra}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reference"]:
        reference_app(argv[1:], prog_name="dllama-validate reference")
    else:
        validate_app(argv, prog_name="dllama-validate")


if __name__ == "__main__":
    main()
