"""Run every check on a `.m` / `.t` pair and collect the report (the CLI is a thin shell over this)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dllama.checkpoint import Checkpoint, CheckpointError
from dllama.formats import FloatType, FormatError, ModelHeader, TokenizerFile
from dllama.tokenizer.convert import TokenizerConversionError, convert_tokenizer
from dllama.validate import checks, fidelity
from dllama.validate.reference import (
    DEFAULT_MAX_TOKENS, DEFAULT_PROMPTS, ROUNDABLE, ReferenceError, ReferenceLogits, compute_reference,
)
from dllama.validate.report import CheckResult, InputError, Report, Status, failed, skipped

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Options:
    prompts: Sequence[str] = DEFAULT_PROMPTS   # logit prompts when computing the reference here
    max_tokens: int = DEFAULT_MAX_TOKENS       # tokens per logit prompt
    corpus_limit: int | None = None            # texts for tokenizer fidelity (None: the whole corpus)
    nthreads: int | None = None                # runtime threads


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """SOURCE as dllama-convert reads it: a local folder or a hub repo id (converter/hub.py)."""
    from dllama.converter.hub import SourceError, resolve_source

    try:
        return Checkpoint(resolve_source(str(source)))
    except (CheckpointError, SourceError) as e:
        raise InputError(f"--hf: {e}") from None


def load_reference(path: str | os.PathLike) -> ReferenceLogits:
    try:
        return ReferenceLogits.load(path)
    except ReferenceError as e:
        raise InputError(str(e)) from None


def validate(model_path: str | os.PathLike, tokenizer_path: str | os.PathLike, hf: str | os.PathLike | None = None,
             reference: str | os.PathLike | None = None, options: Options | None = None,
             progress: StageProgress | None = None) -> Report:
    """All checks; raises InputError (exit 2) only when an input cannot be read at all."""
    options = options or Options()
    model_path, tokenizer_path = Path(model_path), Path(tokenizer_path)
    checks.require_model_magic(model_path)
    checks.require_tokenizer_magic(tokenizer_path)
    ref = load_reference(reference) if reference else None
    ckpt = open_checkpoint(hf) if hf else None
    report = Report(inputs={"model": str(model_path), "tokenizer": str(tokenizer_path),
                            "hf": str(ckpt.folder) if ckpt else None, "reference": str(reference) if reference else None})
    add = report.checks.append
    step = (lambda stage: (lambda done, total: progress(stage, done, total))) if progress else (lambda stage: None)

    header, mf, results = checks.open_model(model_path)
    report.checks += results
    model_ok = mf is not None and results[0].status != Status.FAIL
    add(checks.tensor_health(mf) if mf else skipped("model.tensors", "the model file failed the checks above"))
    if ckpt is None:
        add(skipped("model.header_vs_config", "give --hf SOURCE to compare with the original config"))
        add(skipped("model.weights_vs_checkpoint", "give --hf SOURCE to compare with the original weights"))
    else:
        add(checks.header_vs_config(header, ckpt) if header else skipped("model.header_vs_config", "no readable header"))
        add(checks.weights_vs_checkpoint(mf, ckpt, step("weights vs checkpoint")) if mf
            else skipped("model.weights_vs_checkpoint", "the model file failed the checks above"))

    tf, result = checks.open_tokenizer(tokenizer_path)
    add(result)
    source_tf = source_tokenizer_file(ckpt)
    source_tok = (fidelity.SourceTokenizer.from_folder(ckpt.folder) if ckpt else None) or \
        (fidelity.SourceTokenizer.from_embedded(tf) if tf else None)
    report.checks += tokenizer_structure(header, tf, source_tf, source_tok, ckpt is not None, chat_renderer(tokenizer_path))
    report.checks += tokenizer_fidelity(tokenizer_path, tf, source_tok, options, step)

    if ref is None and ckpt is not None and model_ok:
        roundings = [header.weights_float_type] if header.weights_float_type in ROUNDABLE else []
        ref = reference_from_checkpoint(ckpt, source_tok, source_tf or tf, options, roundings, step("reference logits"))
    if not model_ok:
        report.checks += fidelity.skip_logits("the model file failed the checks above")
    elif ref is None:
        report.checks += fidelity.skip_logits("give --hf SOURCE or --reference REF.npz to compare logits with the original model")
    else:
        report.checks += run_logit_fidelity(model_path, header, ref, options, step("logit fidelity"))
    return report


def source_tokenizer_file(ckpt: Checkpoint | None) -> TokenizerFile | None:
    if ckpt is None:
        return None
    try:
        return convert_tokenizer(ckpt.folder, embed=False)
    except TokenizerConversionError:
        return None


def tokenizer_structure(header: ModelHeader | None, tf: TokenizerFile | None, source_tf: TokenizerFile | None,
                        source_tok, have_hf: bool, render: Callable[[list[dict]], str]) -> list[CheckResult]:
    names = ("tokenizer.vocab_size", "tokenizer.special_ids", "tokenizer.byte_fallback", "tokenizer.chat_template",
             "tokenizer.vs_source")
    if tf is None:
        return [skipped(n, "the tokenizer file failed to parse") for n in names]
    out = [checks.vocab_sizes_equal(header, tf) if header else skipped(names[0], "no readable model header")]
    if source_tf is not None:
        out.append(checks.special_ids(tf, source_tf.bos_id, source_tf.eos_ids))
    else:
        out.append(checks.special_ids(tf, *checks.expected_special_ids_from_embedded(tf)))
    out.append(checks.byte_fallback(tf, source_tok.byte_fallback if source_tok else None))
    out.append(checks.chat_template(render, tf.chat_template))
    if source_tf is not None:
        out.append(checks.tokenizer_vs_source(tf, source_tf))
    else:
        out.append(skipped(names[4], "give --hf SOURCE to compare with the original tokenizer" if not have_hf
                           else "the source folder's tokenizer cannot be converted"))
    return out


def chat_renderer(path: Path) -> Callable[[list[dict]], str]:
    """The runtime tokenizer's own renderer, so the check exercises what dllama-run will do."""
    def render(messages: list[dict]) -> str:
        return load_tokenizer(path, "faithful").render_chat(messages, add_generation_prompt=True)
    return render


def tokenizer_fidelity(path: Path, tf: TokenizerFile | None, source_tok, options: Options, step) -> list[CheckResult]:
    names = ("tokenizer.faithful", "tokenizer.reference_runtime")
    if tf is None:
        return [skipped(n, "the tokenizer file failed to parse") for n in names]
    if source_tok is None:
        return [skipped(n, "no Hugging Face tokenizer to compare with: give --hf SOURCE or embed it (dllama-convert)")
                for n in names]
    texts = fidelity.corpus_texts()[:options.corpus_limit]
    return [
        fidelity.faithful_fidelity(load_tokenizer(path, "faithful"), tf, source_tok, texts, step("tokenizer (faithful)")),
        fidelity.reference_runtime_fidelity(load_tokenizer(path, "reference"), tf, source_tok, texts,
                                            step("tokenizer (reference runtime)")),
    ]


def load_tokenizer(path: Path, mode: str):
    """dllama.tokenizer's Tokenizer; its inexactness warning is reported by tokenizer.faithful instead."""
    from dllama.tokenizer import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Tokenizer.load(path, mode=mode)


def reference_from_checkpoint(ckpt: Checkpoint, source_tok, tf: TokenizerFile | None, options: Options,
                              roundings: list[FloatType], progress) -> ReferenceLogits | None:
    if source_tok is None or tf is None:
        return None
    ids = fidelity.reference_prompt_ids(source_tok, tf.bos_id, tf.add_bos, options.prompts, options.max_tokens)
    return compute_reference(ckpt, ids, list(options.prompts), roundings=roundings, progress=progress)


def run_logit_fidelity(model_path: Path, header: ModelHeader, ref: ReferenceLogits, options: Options,
                       progress) -> list[CheckResult]:
    from dllama.runtime.engine import Engine

    longest = max(len(i) for i in ref.ids)
    try:
        engine = Engine.load(model_path, max_seq_len=max(longest, 1), nthreads=options.nthreads)
    except (FormatError, ValueError) as e:
        return [failed("logits.fidelity", "-", "-", f"our runtime cannot load the model: {e}"),
                skipped("logits.vs_rounded", "our runtime cannot load the model")]

    def run(ids: np.ndarray) -> np.ndarray:
        engine.reset()
        return engine.forward([int(i) for i in ids], 0)

    return fidelity.logit_fidelity(run, header.weights_float_type, header.vocab_size, ref, progress)
