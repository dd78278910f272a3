"""Tokenizer fidelity: does the pair tokenize like the original model?

dllama.tokenizer (faithful mode, and the reference C++ runtime's algorithm) against the Hugging
Face tokenizer on a corpus; and the reference prompts tokenized like the original. The logit
checks live in logits.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dllama.errors import TokenizerError
from dllama.formats import EmbeddedKind, TokenizerFile
from dllama.validate.reference import DEFAULT_MAX_TOKENS, DEFAULT_PROMPTS
from dllama.validate.report import CheckResult, failed, passed, warned

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# The Hugging Face tokenizer, from the source folder or from the copy embedded in the `.t`

@dataclass
class SourceTokenizer:
    """Hugging Face tokenization without special tokens: `tokenizers` for tokenizer.json,
    sentencepiece for tokenizer.model (what transformers' tokenizers wrap)."""

    encode_fn: Callable[[str], list[int]]
    byte_fallback: bool
    origin: str

    def encode(self, text: str) -> list[int]:
        return self.encode_fn(text)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "SourceTokenizer | None":
        folder = Path(folder)
        if (folder / "tokenizer.model").is_file():
            return cls._sentencepiece((folder / "tokenizer.model").read_bytes(), str(folder / "tokenizer.model"))
        if (folder / "tokenizer.json").is_file():
            return cls._tokenizer_json((folder / "tokenizer.json").read_text(encoding="utf-8"),
                                       str(folder / "tokenizer.json"))
        return None

    @classmethod
    def from_embedded(cls, tf: TokenizerFile) -> "SourceTokenizer | None":
        sp = tf.embedded_source(EmbeddedKind.SENTENCEPIECE)
        if sp is not None:
            try:
                return cls._sentencepiece(sp, "the tokenizer.model embedded in the .t")
            except RuntimeError as e:  # sentencepiece's error for a broken model proto
                raise TokenizerError(f"the tokenizer.model embedded in the .t cannot be loaded ({e})") from None
        js = tf.embedded_source(EmbeddedKind.TOKENIZER_JSON)
        if js is not None:
            try:
                return cls._tokenizer_json(js.decode("utf-8"), "the tokenizer.json embedded in the .t")
            except Exception as e:  # tokenizers raises plain Exception; bad utf-8 a ValueError
                raise TokenizerError(f"the tokenizer.json embedded in the .t cannot be loaded ({e})") from None
        return None

    @classmethod
    def _sentencepiece(cls, proto: bytes, origin: str) -> "SourceTokenizer":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        has_bytes = any(sp.is_byte(i) for i in range(sp.get_piece_size()))
        return cls(lambda text: list(sp.encode(text)), has_bytes, origin)

    @classmethod
    def _tokenizer_json(cls, text: str, origin: str) -> "SourceTokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(text)
        model = json.loads(text).get("model") or {}
        return cls(lambda t: tok.encode(t, add_special_tokens=False).ids, bool(model.get("byte_fallback")), origin)


# --------------------------------------------------------------------------------------------
# Tokenizer fidelity

def corpus_texts() -> list[str]:
    """The tokenizer's built-in corpus (dllama/tokenizer/corpus.py: >= 300 varied texts)."""
    from dllama.tokenizer.corpus import corpus

    return corpus()


def agreement(encode: Callable[[str], list[int]], source: SourceTokenizer, texts: Sequence[str],
              progress: Progress | None = None) -> tuple[int, list[tuple[str, list[int] | str, list[int]]]]:
    """(texts encoded identically, [(text, ours, theirs) for each mismatch]); `ours` is the error
    message when our side raises (the reference runtime's algorithm aborts on some inputs)."""
    same, mismatches = 0, []
    for i, text in enumerate(texts):
        theirs = list(source.encode(text))
        try:
            ours: list[int] | str = list(encode(text))
        except ValueError as e:
            ours = str(e)
        if ours == theirs:
            same += 1
        else:
            mismatches.append((text, ours, theirs))
        if progress and (i % 32 == 31 or i + 1 == len(texts)):
            progress(i + 1, len(texts))
    return same, mismatches


def side_by_side(tf: TokenizerFile, text: str, ours: list[int] | str, theirs: list[int], width: int = 6) -> str:
    """The first differing stretch as token strings: `text: ours [...] | hf [...]`."""
    snippet = text[:40].replace("\n", "\\n")
    if isinstance(ours, str):
        return f"{snippet!r}: ours fails ({ours[:120]})"
    start = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    start = max(0, start - 1)

    def show(ids: list[int]) -> str:
        return " ".join(repr(tf.tokens[i].decode("utf-8", "replace")) if 0 <= i < tf.vocab_size else f"#{i}"
                        for i in ids[start:start + width])

    return f"{snippet!r}: ours [{show(ours)}] | hf [{show(theirs)}]"


def faithful_fidelity(tokenizer, tf: TokenizerFile, source: SourceTokenizer, texts: Sequence[str],
                      progress: Progress | None = None) -> CheckResult:
    """Our runtime's tokenizer must agree with Hugging Face on every text when it carries the
    original tokenizer (tok.exact); without it the agreement is only reported (warn)."""
    same, mismatches = agreement(lambda t: tokenizer.encode(t, add_bos=False), source, texts, progress)
    rate = same / max(len(texts), 1)
    measured = f"{same}/{len(texts)} texts ({rate:.1%})"
    shown = [side_by_side(tf, *m) for m in mismatches[:3]]
    details = dict(agreement=rate, texts=len(texts), against=source.origin, first_mismatches=shown)
    if not mismatches:
        return passed("tokenizer.faithful", measured, "100%", **details)
    if getattr(tokenizer, "exact", True):
        return failed("tokenizer.faithful", measured, "100%",
                      f"dllama-run tokenizes differently from {source.origin}: {' ; '.join(shown)}; "
                      "the .t embeds another tokenizer: convert it from the model's own folder", **details)
    return warned("tokenizer.faithful", measured, "100%",
                  "the .t carries no embedded Hugging Face tokenizer, so dllama-run approximates it: "
                  f"{' ; '.join(shown[:1])}; convert the tokenizer with dllama-convert to embed it", **details)


def reference_runtime_fidelity(tokenizer, tf: TokenizerFile, source: SourceTokenizer, texts: Sequence[str],
                               progress: Progress | None = None) -> CheckResult:
    """The reference C++ runtime's algorithm (FORMAT.md §4.1): reported, never failing, since
    the pair is for our runtime; a plain-language warning says what that runtime would do."""
    same, mismatches = agreement(lambda t: tokenizer.encode(t, add_bos=False), source, texts, progress)
    rate = same / max(len(texts), 1)
    measured = f"{same}/{len(texts)} texts ({rate:.1%})"
    shown = [side_by_side(tf, *m) for m in mismatches[:3]]
    details = dict(agreement=rate, texts=len(texts), first_mismatches=shown, bos_id=tf.bos_id,
                   aborts=sum(isinstance(m[1], str) for m in mismatches))
    special = tf.vocab_size - tf.bos_id
    warnings = []
    if special > max(16, tf.vocab_size // 10):
        warnings.append(f"bos_id is {tf.bos_id}, so the reference C++ runtime treats {special} of {tf.vocab_size} "
                        "tokens as special and mangles every prompt")
    aborts = sum(isinstance(m[1], str) for m in mismatches)
    if aborts:
        warnings.append(f"the reference C++ runtime aborts on {aborts} of {len(texts)} texts "
                        f"(e.g. {next(side_by_side(tf, *m) for m in mismatches if isinstance(m[1], str))})")
    if len(mismatches) > aborts:
        first = next(side_by_side(tf, *m) for m in mismatches if not isinstance(m[1], str))
        warnings.append(f"the reference C++ runtime would tokenize {len(mismatches) - aborts} of {len(texts)} texts "
                        "differently "
                        f"from Hugging Face (no pre-tokenizer), e.g. {first}")
    if warnings:
        return warned("tokenizer.reference_runtime", measured, "informational",
                      "; ".join(warnings) + "; its answers will be worse than the original model's: run this pair with "
                                            "dllama-run",
                      **details)
    return passed("tokenizer.reference_runtime", measured, "informational", **details)


# --------------------------------------------------------------------------------------------
# The reference's prompts, tokenized like the original

def reference_prompt_ids(source: SourceTokenizer, bos_id: int | None, add_bos: bool,
                         prompts: Sequence[str] = DEFAULT_PROMPTS,
                         max_tokens: int = DEFAULT_MAX_TOKENS) -> list[np.ndarray]:
    """Each prompt's ids (bos first when the tokenizer adds one), cut to max_tokens."""
    prefix = [bos_id] if add_bos and bos_id is not None else []
    return [np.asarray((prefix + source.encode(p))[:max_tokens], dtype=np.int64) for p in prompts]
