"""Run every check on a `.m` / `.t` pair and collect the report (the CLI is a thin shell over this)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dllama.checkpoint import Checkpoint, CheckpointError
from dllama.errors import DllamaError, TokenizerError
from dllama.formats import FloatType, ModelFile, ModelHeader, TokenizerFile, tensor_plan
from dllama.tokenizer.from_hf import TokenizerConversionError, convert_tokenizer
from dllama.validate import checks, fidelity, logits
from dllama.validate.reference import (
    ARITHMETIC_TYPES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PROMPTS,
    DEFAULT_TRACED,
    ReferenceLogits,
    ReferenceModelError,
    compute_reference,
)
from dllama.validate.report import CheckResult, InputError, Report, Status, failed, passed, skipped

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Options:
    prompts: Sequence[str] = DEFAULT_PROMPTS   # logit prompts when computing the reference here
    max_tokens: int = DEFAULT_MAX_TOKENS       # tokens per logit prompt
    corpus_limit: int | None = None            # texts for tokenizer fidelity (None: the whole corpus)
    nthreads: int | None = None                # runtime threads


@dataclass
class Original:
    """The original model as the checks need it: its checkpoint (a Hugging Face folder, or a
    GGUF file dequantized with `gguf`), its tokenizer, and that tokenizer converted afresh."""

    checkpoint: object                      # checkpoint.Checkpoint | gguf_checkpoint.GGUFCheckpoint
    tokenizer: fidelity.SourceTokenizer | None
    tokenizer_file: TokenizerFile | None

    @property
    def where(self) -> str:
        return str(self.checkpoint.folder)


class RememberedReads:
    """A checkpoint whose tensors, once read, are kept while they fit `budget` bytes: the weights
    check and the reference runs then dequantize a GGUF (or decode bf16) once, not twice."""

    def __init__(self, checkpoint, budget: int = 1 << 30):
        self.ckpt = checkpoint
        self.budget = budget
        self.kept: dict[str, np.ndarray] = {}

    def __getattr__(self, name: str):
        return getattr(self.ckpt, name)

    def __contains__(self, name: str) -> bool:
        return name in self.ckpt

    def get(self, name: str) -> np.ndarray:
        if name in self.kept:
            return self.kept[name]
        w = self.ckpt.get(name)
        if w.nbytes <= self.budget:
            w.setflags(write=False)  # shared: nobody may change it in place
            self.kept[name] = w
            self.budget -= w.nbytes
        return w


def open_original(source: str | os.PathLike) -> Original:
    """SOURCE as dllama-convert reads it: a local folder, a GGUF file or a hub repo id."""
    from dllama.converter.hub import SourceError, resolve_source
    from dllama.gguf_checkpoint import GGUFCheckpoint
    from dllama.tokenizer.from_gguf import GGUFTokenizer

    path = Path(source).expanduser()
    try:
        if path.is_file():
            ckpt = GGUFCheckpoint(path)
            try:
                gguf_tok = GGUFTokenizer(ckpt)
                tf = gguf_tok.tokenizer_file(embed=False)
                tok = fidelity.SourceTokenizer._tokenizer_json(gguf_tok.tokenizer_json(),
                                                               f"the tokenizer of {path.name}")
            except TokenizerConversionError:
                tf, tok = None, None
            return Original(RememberedReads(ckpt), tok, tf)
        ckpt = Checkpoint(resolve_source(str(source)))
    except (CheckpointError, SourceError) as e:
        raise InputError(f"--hf: {e}") from None
    try:
        tf = convert_tokenizer(ckpt.folder, embed=False)
    except TokenizerConversionError:
        tf = None
    return Original(RememberedReads(ckpt), fidelity.SourceTokenizer.from_folder(ckpt.folder), tf)


def load_reference(path: str | os.PathLike) -> ReferenceLogits:
    try:
        return ReferenceLogits.load(path)
    except ReferenceModelError as e:
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
    original = open_original(hf) if hf else None
    report = Report(inputs={"model": str(model_path), "tokenizer": str(tokenizer_path),
                            "hf": original.where if original else None,
                            "reference": str(reference) if reference else None})
    add = report.checks.append
    step = (lambda stage: (lambda done, total: progress(stage, done, total))) if progress else (lambda stage: None)

    header, mf, results = checks.open_model(model_path)
    report.checks += results
    model_ok = mf is not None and results[0].status != Status.FAIL
    add(checks.tensor_health(mf) if mf else skipped("model.tensors", "the model file failed the checks above"))
    config = original.checkpoint.config if original else (ref.config if ref else None)
    if config is None:
        add(skipped("model.header_vs_config",
                    "give --hf SOURCE (or a REF.npz that carries the config) to compare with the original config"))
    else:
        add(checks.header_vs_config(header, config) if header else skipped("model.header_vs_config",
                                                                           "no readable header"))
    if original is None:
        add(skipped("model.weights_vs_checkpoint", "give --hf SOURCE to compare with the original weights"))
    else:
        add(checks.weights_vs_checkpoint(mf, original.checkpoint, step("weights vs checkpoint")) if mf
            else skipped("model.weights_vs_checkpoint", "the model file failed the checks above"))

    tf, result = checks.open_tokenizer(tokenizer_path)
    add(result)
    source_tf = original.tokenizer_file if original else None
    source_tok, unusable = original.tokenizer if original else None, None
    if source_tok is None and tf is not None:
        try:
            source_tok = fidelity.SourceTokenizer.from_embedded(tf)
        except TokenizerError as e:  # dllama-run cannot load it either: tokenizer.faithful fails
            unusable = e
    report.checks += tokenizer_structure(header, tf, source_tf, ref, source_tok, original is not None,
                                         chat_renderer(tokenizer_path))
    report.checks += tokenizer_fidelity(tokenizer_path, tf, source_tok, options, step, unusable)
    add(tokenizer_vs_reference(tokenizer_path, tf, ref))

    if ref is None and original is not None and model_ok:
        ref = reference_from_original(original, header.weights_float_type, tf, options, step("reference runs"))
    if not model_ok:
        report.checks += logits.skip_logits("the model file failed the checks above")
    elif ref is None:
        report.checks += logits.skip_logits("give --hf SOURCE or --reference REF.npz to compare logits with the "
                                            "original model")
    else:
        report.checks += run_logit_checks(model_path, header, ref, options, step)
    return report


def tokenizer_structure(header: ModelHeader | None, tf: TokenizerFile | None, source_tf: TokenizerFile | None,
                        ref: ReferenceLogits | None, source_tok, have_hf: bool,
                        render: Callable[[list[dict]], str]) -> list[CheckResult]:
    names = ("tokenizer.vocab_size", "tokenizer.special_ids", "tokenizer.byte_fallback", "tokenizer.chat_template",
             "tokenizer.vs_source")
    if tf is None:
        return [skipped(n, "the tokenizer file failed to parse") for n in names]
    out = [checks.vocab_sizes_equal(header, tf) if header else skipped(names[0], "no readable model header")]
    if source_tf is not None:
        out.append(checks.special_ids(tf, source_tf.bos_id, source_tf.eos_ids))
    elif ref is not None and ref.bos_id is not None:
        out.append(checks.special_ids(tf, ref.bos_id, ref.eos_ids))
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
    # a tokenizer dllama-run cannot load fails tokenizer.faithful; the template check then
    # reports the same error as a template that does not render
    """The runtime tokenizer's own renderer, so the check exercises what dllama-run will do."""
    def render(messages: list[dict]) -> str:
        return load_tokenizer(path, "faithful").render_chat(messages, add_generation_prompt=True)
    return render


def tokenizer_fidelity(path: Path, tf: TokenizerFile | None, source_tok, options: Options, step,
                       unusable: TokenizerError | None = None) -> list[CheckResult]:
    names = ("tokenizer.faithful", "tokenizer.reference_runtime")
    if tf is None:
        return [skipped(n, "the tokenizer file failed to parse") for n in names]
    if unusable is not None:
        return [failed(names[0], "unusable", "100%", f"dllama-run cannot load this tokenizer: {unusable}"),
                skipped(names[1], "dllama-run cannot load this tokenizer")]
    if source_tok is None:
        return [skipped(n, "no Hugging Face tokenizer to compare with: give --hf SOURCE or embed it (dllama-convert)")
                for n in names]
    texts = fidelity.corpus_texts()[:options.corpus_limit]
    try:
        faithful = load_tokenizer(path, "faithful")
    except TokenizerError as e:
        return [failed(names[0], "unusable", "100%", f"dllama-run cannot load this tokenizer: {e}"),
                skipped(names[1], "dllama-run cannot load this tokenizer")]
    return [
        fidelity.faithful_fidelity(faithful, tf, source_tok, texts, step("tokenizer (faithful)")),
        fidelity.reference_runtime_fidelity(load_tokenizer(path, "reference"), tf, source_tok, texts,
                                            step("tokenizer (reference runtime)")),
    ]


def load_tokenizer(path: Path, mode: str):
    """dllama.tokenizer's Tokenizer; its inexactness warning is reported by tokenizer.faithful instead."""
    from dllama.tokenizer import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Tokenizer.load(path, mode=mode)


def tokenizer_vs_reference(path: Path, tf: TokenizerFile | None, ref: ReferenceLogits | None) -> CheckResult:
    """Without the checkpoint, REF.npz's prompts and their original ids still tell a tokenizer of
    another model (same vocabulary size, other ids)."""
    name = "tokenizer.vs_reference"
    if ref is None or not ref.prompts:
        return skipped(name, "needs --reference REF.npz with its prompts")
    if tf is None:
        return skipped(name, "the tokenizer file failed to parse")
    try:
        tok = load_tokenizer(path, "faithful")
    except TokenizerError as e:
        return skipped(name, f"dllama-run cannot load this tokenizer ({e})")
    texts = list(ref.prompts)
    differ = []
    for text, want in zip(texts, ref.ids):
        got = ([tf.bos_id] if tf.add_bos else []) + tok.encode(text, add_bos=False)
        if list(got[:len(want)]) != [int(i) for i in want]:
            differ.append(text)
    measured = f"{len(texts) - len(differ)}/{len(texts)} prompts"
    if differ:
        return failed(name, measured, "all prompts",
                      f"dllama-run tokenizes {differ[0][:40]!r} differently from the original "
                      "(REF.npz's ids): the .t belongs to another model; convert the tokenizer from the model's own "
                      "folder")
    return passed(name, measured, "all prompts")


def reference_from_original(original: Original, float_type: FloatType, tf: TokenizerFile | None, options: Options,
                            progress) -> ReferenceLogits | None:
    """An exact run on every prompt and a traced run with the file's arithmetic on the first
    ones (a q40/q80 file), computed here."""
    source_tf = original.tokenizer_file or tf
    if original.tokenizer is None or source_tf is None:
        return None
    return make_reference(original, source_tf, options.prompts, options.max_tokens,
                          [float_type] if float_type in ARITHMETIC_TYPES else [], progress)


def make_reference(original: Original, source_tf: TokenizerFile, prompts: Sequence[str], max_tokens: int,
                   arithmetics: Sequence[FloatType], progress) -> ReferenceLogits:
    ids = fidelity.reference_prompt_ids(original.tokenizer, source_tf.bos_id, source_tf.add_bos, prompts, max_tokens)
    ref = compute_reference(original.checkpoint, ids, list(prompts), arithmetics=arithmetics,
                            traced=min(DEFAULT_TRACED, len(prompts)), progress=progress)
    ref.bos_id, ref.eos_ids = source_tf.bos_id, list(source_tf.eos_ids)
    return ref


class EngineBlocks:
    """logits.RuntimeBlocks over an Engine's one-node layers (engine.py's loop, block by block)."""

    def __init__(self, engine):
        from dllama.runtime.model import rmsnorm

        self.layers, self.norm = engine.layers, rmsnorm
        self.eps = engine.header.norm_epsilon
        self.n_layers = engine.header.n_layers

    def attention(self, layer: int, x: np.ndarray) -> np.ndarray:
        lw = self.layers.w.layers[layer]
        return self.layers.attention(layer, self.norm(x, lw.attn_norm, self.eps), 0)

    def ffn(self, layer: int, x: np.ndarray) -> np.ndarray:
        lw = self.layers.w.layers[layer]
        return self.layers.ffn(layer, self.norm(x, lw.ffn_norm, self.eps))

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.layers.logits(x)


class FileBlocks:
    """logits.RuntimeBlocks by the reference forward (reference.ReferenceModel) on the file's own
    weights as stored, in the Hugging Face layout, with q80 activations and the original's config:
    what an error-aware q40 file specifies block by block."""

    def __init__(self, model_path: Path, config: dict):
        from dllama.validate.reference import Arithmetic, ReferenceModel

        self.model = ReferenceModel(FileTensors(ModelFile(model_path), config),
                                    Arithmetic(FloatType.F32, q80_activations=True))
        self.n_layers = self.model.cfg.n_layers

    def attention(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.model.attention_block(layer, x, [len(x)])

    def ffn(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.model.ffn_block(layer, x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.model.head(x)


class FileTensors:
    """A `.m` answering like a Checkpoint: Hugging Face names, float32, q/k rows un-permuted."""

    def __init__(self, model_file: ModelFile, config: dict):
        from dllama.gguf_checkpoint import unpermute_rotary_rows

        self.file, self.config, self.unpermute = model_file, config, unpermute_rotary_rows
        self.specs = {t.spec.hf_name: t.spec for t in model_file.layout.values()}

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def get(self, name: str) -> np.ndarray:
        spec = self.specs[name]
        w = self.file.tensor(spec.name)
        return self.unpermute(w, spec.permute_heads) if spec.permute_heads else w


def run_logit_checks(model_path: Path, header: ModelHeader, ref: ReferenceLogits, options: Options,
                     step) -> list[CheckResult]:
    from dllama.runtime.engine import Engine

    longest = max(len(i) for i in ref.ids)
    try:
        engine = Engine.load(model_path, max_seq_len=max(longest, 1), nthreads=options.nthreads)
    except DllamaError as e:
        return [failed("logits.correctness", "-", "-", f"our runtime cannot load the model: {e}"),
                skipped("logits.quality", "our runtime cannot load the model")]

    def run(ids: np.ndarray) -> np.ndarray:
        engine.reset()
        return engine.forward([int(i) for i in ids], 0)

    file_blocks = FileBlocks(model_path, ref.config) if ref.config and header.weights_float_type == FloatType.Q40 \
        else None
    return logits.logit_checks(run, EngineBlocks(engine), header.weights_float_type, header.vocab_size,
                               parameter_count(header), ref, step, file_blocks)


def parameter_count(h: ModelHeader) -> int:
    return sum(int(np.prod(spec.shape)) for spec in tensor_plan(h))
