"""Tokenizer encoding speed: faithful mode (target >= 1 MB/s of English text) and reference mode.

    python benchmarks/tokenizer_speed.py                 # Llama 2 fixture + tiny byte-level fixture, 4 MB
    python benchmarks/tokenizer_speed.py --mb 8 --tokenizer model.t

Converts the fixture tokenizers in memory (embedding the Hugging Face tokenizer), encodes
English prose and code from dllama.tokenizer.corpus.english_text, and prints MB/s per case on
stdout. Progress goes to stderr.
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from dllama.formats import read_tokenizer
from dllama.tokenizer import Tokenizer
from dllama.tokenizer.corpus import english_text
from dllama.tokenizer.from_hf import convert_tokenizer

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
SOURCES = {"llama2 (sentencepiece-style BPE)": FIXTURES / "tokenizers" / "llama2",
           "tiny-llama (byte-level BPE)": FIXTURES / "conformance" / "tiny-llama"}


def timed(fn: Callable[[], list]) -> tuple[float, int]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, sum(len(x) for x in out) if out and isinstance(out[0], list) else len(out)


def measure(name: str, tok: Tokenizer, text: str, paragraphs: list[str]) -> None:
    mb = len(text.encode("utf-8")) / 1e6
    seconds, n = timed(lambda: tok.encode(text))
    print(f"{name:45s} {tok.mode:9s} one call     {mb:6.2f} MB {n:9d} tokens {seconds:7.2f} s {mb / seconds:8.2f} MB/s")
    seconds, n = timed(lambda: [tok.encode(p) for p in paragraphs])
    print(f"{name:45s} {tok.mode:9s} per paragraph{mb:6.2f} MB {n:9d} tokens {seconds:7.2f} s {mb / seconds:8.2f} MB/s")
    sys.stdout.flush()


def main(mb: float = typer.Option(4.0, help="megabytes of English text to encode"),
         tokenizer: Optional[Path] = typer.Option(None, help="a .t to measure instead of the fixtures"),
         reference_mb: float = typer.Option(0.5, help="megabytes for the (slower) reference mode")) -> None:
    text = english_text(int(mb * 1e6))
    paragraphs = text.split("\n\n")
    ref_text = english_text(int(reference_mb * 1e6))
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}", flush=True)
    cases = {str(tokenizer): read_tokenizer(tokenizer)} if tokenizer else {
        name: convert_tokenizer(folder) for name, folder in SOURCES.items() if folder.is_dir()}
    if not cases:
        raise SystemExit(f"no tokenizer to measure: {FIXTURES} is absent; pass --tokenizer model.t")
    for name, tf in cases.items():
        print(f"encoding with {name}", file=sys.stderr)
        measure(name, Tokenizer(tf, "faithful", where=name), text, paragraphs)
        measure(name, Tokenizer(tf, "reference", where=name), ref_text, ref_text.split("\n\n"))


if __name__ == "__main__":
    typer.run(main)
