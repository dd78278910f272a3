"""Fidelity checks: does the pair behave like the original model?

Tokenizer fidelity compares dllama.tokenizer (faithful mode, and the reference C++ runtime's
algorithm) with the Hugging Face tokenizer on a corpus. Logit fidelity compares our runtime on
the converted `.m` with reference logits of the original checkpoint (validate/reference.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dllama.formats import EmbeddedKind, FloatType, TokenizerFile
from dllama.validate.reference import DEFAULT_MAX_TOKENS, DEFAULT_PROMPTS, ReferenceLogits
from dllama.validate.report import CheckResult, failed, passed, skipped, warned

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
            return cls._tokenizer_json((folder / "tokenizer.json").read_text(encoding="utf-8"), str(folder / "tokenizer.json"))
        return None

    @classmethod
    def from_embedded(cls, tf: TokenizerFile) -> "SourceTokenizer | None":
        sp = tf.embedded_source(EmbeddedKind.SENTENCEPIECE)
        if sp is not None:
            return cls._sentencepiece(sp, "the tokenizer.model embedded in the .t")
        js = tf.embedded_source(EmbeddedKind.TOKENIZER_JSON)
        if js is not None:
            return cls._tokenizer_json(js.decode("utf-8"), "the tokenizer.json embedded in the .t")
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
        warnings.append(f"the reference C++ runtime would tokenize {len(mismatches) - aborts} of {len(texts)} texts differently "
                        f"from Hugging Face (no pre-tokenizer), e.g. {first}")
    if warnings:
        return warned("tokenizer.reference_runtime", measured, "informational",
                      "; ".join(warnings) + "; its answers will be worse than the original model's: run this pair with dllama-run",
                      **details)
    return passed("tokenizer.reference_runtime", measured, "informational", **details)


# --------------------------------------------------------------------------------------------
# Logit fidelity

@dataclass(frozen=True)
class LogitThresholds:
    min_top1: float       # fraction of positions whose argmax agrees
    max_mean_kl: float    # mean KL(reference || ours) over positions, nats
    max_p99_kl: float     # 99th percentile of the per-position KL
    max_abs: float        # max |logit difference|, relative to the reference's max |logit|

    def describe(self) -> str:
        return f"top1>={self.min_top1:g} KL mean<={self.max_mean_kl:g} p99<={self.max_p99_kl:g} abs<={self.max_abs:g}"


# From `python benchmarks/validate.py thresholds` and the synthetic TinyLlama benchmark
# (docs/VALIDATE.md). Against the EXACT original (logits.fidelity) quantization noise grows with
# depth: correct q40 files measure KL 0.016 (2-layer fixtures) to 0.13 (22-layer TinyLlama
# shape), q80 1.3e-4 to 1.3e-3; these bounds only keep out gross damage and report the cost of
# quantizing. Against the original with the SAME weight rounding (logits.vs_rounded) only the
# runtime's q80 activations differ: correct files measure KL <= 7e-4, abs <= 0.041, while the
# smallest bug measured (rope_theta x100 on tiny-llama) gives KL 0.004, p99 0.024, abs 0.32.
LOGIT_THRESHOLDS = {
    FloatType.F32: LogitThresholds(min_top1=0.99, max_mean_kl=1e-6, max_p99_kl=1e-5, max_abs=1e-3),
    FloatType.Q80: LogitThresholds(min_top1=0.7, max_mean_kl=5e-3, max_p99_kl=0.02, max_abs=0.2),
    FloatType.Q40: LogitThresholds(min_top1=0.05, max_mean_kl=0.3, max_p99_kl=1.0, max_abs=1.0),
}
ROUNDED_THRESHOLDS = LogitThresholds(min_top1=0.7, max_mean_kl=2e-3, max_p99_kl=1e-2, max_abs=0.15)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare_logits(ours: np.ndarray, reference: np.ndarray) -> dict:
    lp_ref, lp_ours = log_softmax(reference), log_softmax(ours)
    kl = np.sum(np.exp(lp_ref) * (lp_ref - lp_ours), axis=-1)
    scale = float(np.abs(reference).max()) or 1.0
    return {"positions": int(len(reference)), "top1": float(np.mean(ours.argmax(-1) == reference.argmax(-1))),
            "kl": kl, "max_abs": float(np.abs(ours - reference).max()) / scale}


def reference_problem(vocab_size: int, reference: ReferenceLogits) -> str | None:
    if reference.vocab_size != vocab_size:
        return (f"the reference logits have {reference.vocab_size} columns but the model {vocab_size}: "
                "they come from another model, or the .m has the wrong vocab_size")
    if any(i.size and i.max() >= vocab_size for i in reference.ids):
        return "the reference prompts hold ids outside the model's vocabulary: the reference comes from another model"
    return None


def run_prompts(run_model: Callable[[np.ndarray], np.ndarray], reference: ReferenceLogits,
                progress: Progress | None = None) -> list[np.ndarray]:
    """Our runtime's logits for every reference prompt (`run_model` starts at position 0)."""
    out = []
    for j, ids in enumerate(reference.ids):
        out.append(np.asarray(run_model(ids), dtype=np.float32))
        if progress:
            progress(j + 1, len(reference.ids))
    return out


def logit_check(name: str, ours: list[np.ndarray], reference: list[np.ndarray], t: LogitThresholds,
                against: str, prompts: list[str] | None) -> CheckResult:
    per_prompt, kls = [], []
    for got, want in zip(ours, reference):
        m = compare_logits(got, want)
        kls.append(m.pop("kl"))
        m.update(mean_kl=float(kls[-1].mean()), p99_kl=float(np.percentile(kls[-1], 99)))
        per_prompt.append(m)
    all_kl = np.concatenate(kls)
    summary = {"top1": sum(p["top1"] * p["positions"] for p in per_prompt) / len(all_kl),
               "mean_kl": float(all_kl.mean()), "p99_kl": float(np.percentile(all_kl, 99)),
               "max_abs": max(p["max_abs"] for p in per_prompt)}
    measured = (f"top1 {summary['top1']:.3f} KL mean {summary['mean_kl']:.2g} p99 {summary['p99_kl']:.2g} "
                f"abs {summary['max_abs']:.2g}")
    details = dict(summary=summary, per_prompt=per_prompt, prompts=prompts, against=against, thresholds=t.__dict__)
    broken = [what for what, bad in (
        (f"top-1 agreement {summary['top1']:.3f} < {t.min_top1}", summary["top1"] < t.min_top1),
        (f"mean KL {summary['mean_kl']:.3g} > {t.max_mean_kl}", summary["mean_kl"] > t.max_mean_kl),
        (f"p99 KL {summary['p99_kl']:.3g} > {t.max_p99_kl}", summary["p99_kl"] > t.max_p99_kl),
        (f"max abs diff {summary['max_abs']:.3g} > {t.max_abs}", summary["max_abs"] > t.max_abs)) if bad]
    if broken:
        return failed(name, measured, t.describe(),
                      f"our runtime's logits on this file are not {against}'s ({', '.join(broken)}): "
                      "the weights or header are wrong; see the other checks, or reconvert", **details)
    return passed(name, measured, t.describe(), **details)


def logit_fidelity(run_model: Callable[[np.ndarray], np.ndarray], float_type: FloatType, vocab_size: int,
                   reference: ReferenceLogits, progress: Progress | None = None) -> list[CheckResult]:
    """logits.fidelity (against the exact original) and logits.vs_rounded (against the original
    with this file's weight rounding, which isolates conversion/runtime bugs from quantization)."""
    problem = reference_problem(vocab_size, reference)
    if problem:
        return [failed("logits.fidelity", "-", "matching reference", problem),
                skipped("logits.vs_rounded", "the reference does not fit this model")]
    ours = run_prompts(run_model, reference, progress)
    exact = logit_check("logits.fidelity", ours, reference.logits,
                        LOGIT_THRESHOLDS.get(float_type, LOGIT_THRESHOLDS[FloatType.Q80]),  # f16: no runtime runs it
                        "the original model", reference.prompts)
    kind = float_type.name.lower()
    if float_type == FloatType.F32:
        rounded = skipped("logits.vs_rounded", "f32 weights are not rounded: logits.fidelity already compares exactly")
    elif kind not in reference.rounded:
        rounded = skipped("logits.vs_rounded", f"the reference has no {kind}-rounded logits: give --hf SOURCE, or write "
                                               f"REF.npz with `dllama-validate reference --rounded {kind}`")
    else:
        rounded = logit_check("logits.vs_rounded", ours, reference.rounded[kind], ROUNDED_THRESHOLDS,
                              f"the original model with {kind}-rounded weights", reference.prompts)
    return [exact, rounded]


def reference_prompt_ids(source: SourceTokenizer, bos_id: int | None, add_bos: bool,
                         prompts: Sequence[str] = DEFAULT_PROMPTS, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[np.ndarray]:
    prefix = [bos_id] if add_bos and bos_id is not None else []
    return [np.asarray((prefix + source.encode(p))[:max_tokens], dtype=np.int64) for p in prompts]


def skip_logits(reason: str) -> list[CheckResult]:
    return [skipped("logits.fidelity", reason), skipped("logits.vs_rounded", reason)]
