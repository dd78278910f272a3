"""Hugging Face checkpoint -> `.m` model and `.t` tokenizer, validated first, then streamed.

`prepare_conversion` checks everything that can be checked before a byte is written (config,
every tensor's presence and shape, block alignment, tokenizer vs model vocabulary); the
writer then streams each tensor in row chunks: pread into a reused buffer, one numba kernel
pass to the output type, write, next chunk. Page-cache reads instead of memory maps keep the
resident set at a few chunk buffers whatever the model size.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dllama.checkpoint import Checkpoint, TensorEntry
from dllama.converter import calibration, encoders
from dllama.errors import DllamaError
from dllama.formats import (
    BLOCK_SIZE,
    Q40_BYTES,
    Q80_BYTES,
    FloatType,
    ModelHeader,
    TensorSpec,
    TokenizerFile,
    atomic_output,
    padded_vocabulary,
    permute_rotary_rows,
    tensor_plan,
)
from dllama.gguf_checkpoint import DEQUANTIZABLE, GGUFCheckpoint, dequantize
from dllama.tokenizer.from_gguf import GGUFTokenizer
from dllama.tokenizer.from_hf import convert_tokenizer


class ConversionError(DllamaError, ValueError):
    """The checkpoint cannot be converted as asked; the message names the problem and the fix."""


CHUNK_SOURCE_BYTES = 16 << 20  # source bytes per step: bounds the resident set (two buffers)
CHUNK_VALUES = 4 << 20  # and values per step: a dequantized GGUF chunk is float32 plus gguf.quants' temporaries
_SOURCE_KIND = {"BF16": encoders.SRC_BF16, "F16": encoders.SRC_F16, "F32": encoders.SRC_F32}
SOURCE_TYPES = ("BF16", "F16", "F32", "F64") + DEQUANTIZABLE
STORED_AS = {"F32": FloatType.F32, "F16": FloatType.F16, "Q4_0": FloatType.Q40, "Q8_0": FloatType.Q80}
_ENCODERS = {
    FloatType.F32: (encoders.encode_f32, np.uint32),
    FloatType.F16: (encoders.encode_f16, np.uint16),
    FloatType.Q40: (encoders.encode_q40, np.uint8),
    FloatType.Q80: (encoders.encode_q80, np.uint8),
}


def model_filename(name: str, float_type: FloatType) -> str:
    return f"dllama_model_{name}_{float_type.name.lower()}.m"


def tokenizer_filename(name: str) -> str:
    return f"dllama_tokenizer_{name}.t"


def default_name(source: str) -> str:
    """A file-name-safe model name from a folder path, hub repo id or GGUF file (less its quant tag)."""
    base = source.rstrip("/").split("/")[-1] or "model"
    base = re.sub(r"([.-](i?q\d\w*|bf16|f16|f32))?\.gguf$", "", base, flags=re.IGNORECASE) or "model"
    return re.sub(r"[^a-z0-9._-]+", "_", base.lower())


@dataclass(frozen=True)
class PlannedTensor:
    spec: TensorSpec
    entry: TensorEntry  # where its source bytes lie, in the type entry.dtype names
    permute_heads: int | None = None  # heads to apply the rotary permute over (Hugging Face q/k of llama)

    @property
    def rows_cols(self) -> tuple[int, int]:
        shape = self.spec.shape
        return (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])


@dataclass
class ConversionJob:
    source: Path
    config: dict
    header: ModelHeader | None
    tensors: list[PlannedTensor]
    tokenizer: TokenizerFile | None
    model_path: Path | None
    tokenizer_path: Path | None
    embed_tokenizer: bool = True
    notes: list[str] = field(default_factory=list)
    calibration: list[list[int]] | None = None  # token sequences for the error-aware q40 encoder; None: exact

    @property
    def error_aware(self) -> bool:
        """q40 tensors are encoded by encoders.encode_q40_search (and so need activation statistics)."""
        return self.calibration is not None and any(_encodes_q40(t) for t in self.tensors)

    @property
    def source_bytes(self) -> int:
        return sum(t.entry.end - t.entry.start for t in self.tensors)


@dataclass
class ConversionResult:
    plan: ConversionJob
    seconds: float
    sizes: dict[Path, int]


# --------------------------------------------------------------------------------------------
# Planning: every check before any output

def plan_model(checkpoint: Checkpoint, float_type: FloatType) -> tuple[ModelHeader, list[PlannedTensor]]:
    header = checkpoint.header(float_type)
    _check_no_extra_layers(checkpoint, header)
    planned = []
    for spec in tensor_plan(header):
        entry = checkpoint.entries.get(spec.hf_name)
        if entry is None and spec.fallback_hf_name:  # tied or absent lm_head: the embedding (§1.3)
            entry = checkpoint.entries.get(spec.fallback_hf_name)
        if entry is None:
            raise ConversionError(f"{spec.hf_name} is missing from the checkpoint ({checkpoint.looked_in})")
        if entry.shape != spec.shape:
            raise ConversionError(f"{spec.hf_name} has shape {list(entry.shape)} but {checkpoint.config_source} "
                                  f"implies {list(spec.shape)} ({checkpoint.looked_in}); the config does not belong "
                                  "to these weights")
        _check_blocks(spec)
        _check_source_type(spec, entry)
        permute = None if checkpoint.rows_in_file_order else spec.permute_heads
        planned.append(PlannedTensor(spec, entry, permute))
    _check_no_biases(checkpoint, planned)
    return header, planned


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


def _check_no_extra_layers(checkpoint: Checkpoint, header: ModelHeader) -> None:
    """Layers the config does not count would be silently dropped: the config is wrong, refuse."""
    layers = {int(m.group(1)) for name in checkpoint.entries if (m := _LAYER_NAME.match(name))}
    beyond = sorted(n for n in layers if n >= header.n_layers)
    if beyond:
        raise ConversionError(f"the checkpoint holds layer {beyond[0]} ({len(layers)} layers in all) but "
                              f"{checkpoint.config_source} says {header.n_layers} ({checkpoint.looked_in}); the "
                              "config does not belong to these weights")


def _check_no_biases(checkpoint: Checkpoint, planned: list[PlannedTensor]) -> None:
    """Biases would be silently dropped: the format has none (FORMAT.md §1.3), so refuse instead."""
    weights = {t.spec.hf_name for t in planned}
    biases = [n for n in checkpoint.entries if n.endswith(".bias") and n[:-len(".bias")] + ".weight" in weights]
    if biases:
        raise ConversionError(f"{biases[0]} is a bias ({len(biases)} in the checkpoint) and the distributed-llama "
                              f"format has no bias tensors, so this model cannot be converted faithfully")


def _check_blocks(spec: TensorSpec) -> None:
    if spec.float_type in (FloatType.Q40, FloatType.Q80) and spec.shape[-1] % BLOCK_SIZE:
        quant = spec.float_type.name.lower()
        raise ConversionError(f"{spec.hf_name} has rows of {spec.shape[-1]} values, not a multiple of {BLOCK_SIZE}, "
                              f"so it cannot be stored as {quant}; convert with --quant f32")


def _check_source_type(spec: TensorSpec, entry: TensorEntry) -> None:
    if entry.dtype not in SOURCE_TYPES:
        raise ConversionError(f"{spec.hf_name} is stored as {entry.dtype}, which dllama cannot read; "
                              f"supported: {', '.join(SOURCE_TYPES)}")


def _check_special_ids(tokenizer: TokenizerFile) -> None:
    """bos/eos come from config.json for tokenizer.json sources (FORMAT.md §4): they must be tokens."""
    for what, token_id in [("bos", tokenizer.bos_id)] + [("eos", e) for e in tokenizer.eos_ids]:
        if not 0 <= token_id < tokenizer.vocab_size:
            raise ConversionError(f"{what} token id {token_id} is outside the tokenizer's {tokenizer.vocab_size} "
                                  "tokens; "
                                  f"fix {what}_token_id in config.json")


def _check_vocab(header: ModelHeader, tokenizer: TokenizerFile, notes: list[str]) -> None:
    if padded_vocabulary(header.vocab_size, tokenizer.vocab_size):
        notes.append(f"the model's vocabulary ({header.vocab_size}) is padded beyond the tokenizer's "
                     f"({tokenizer.vocab_size} tokens)")
    elif tokenizer.vocab_size != header.vocab_size:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} tokens but config.json vocab_size is "
                              f"{header.vocab_size}; the tokenizer does not belong to this model")


def open_checkpoint(source: Path) -> Checkpoint | GGUFCheckpoint:
    """A Hugging Face folder, or a GGUF file."""
    return GGUFCheckpoint(source) if source.is_file() else Checkpoint(source)


def prepare_conversion(source: Path, float_type: FloatType | None, name: str, output_dir: Path,
                    with_tokenizer: bool = True, embed_tokenizer: bool = True, exact: bool = False,
                    calibration_text: Path | None = None) -> ConversionJob:
    """Check the source (a Hugging Face folder or a GGUF file) and decide every output byte's origin.
    float_type None: tokenizer only. exact: q40 as the reference converter encodes it, else error-aware
    (calibrated on `calibration_text`, default the built-in one)."""
    source = Path(source)
    header, tensors, config = None, [], {}
    checkpoint = open_checkpoint(source) if float_type is not None or source.is_file() else None
    if float_type is not None:
        config = checkpoint.config
        header, tensors = plan_model(checkpoint, float_type)
    tokenizer = None
    if with_tokenizer:
        tokenizer = GGUFTokenizer(checkpoint).tokenizer_file(embed_tokenizer) if isinstance(checkpoint,
                                                                                            GGUFCheckpoint) \
            else convert_tokenizer(source, embed=embed_tokenizer)
    plan = ConversionJob(
        source=source, config=config, header=header, tensors=tensors, tokenizer=tokenizer,
        model_path=output_dir / model_filename(name, float_type) if float_type is not None else None,
        tokenizer_path=output_dir / tokenizer_filename(name) if with_tokenizer else None,
        embed_tokenizer=embed_tokenizer,
    )
    if tokenizer is not None:
        _check_special_ids(tokenizer)
    if header is not None and tokenizer is not None:
        _check_vocab(header, tokenizer, plan.notes)
    if float_type == FloatType.Q40 and not exact and any(_encodes_q40(t) for t in tensors):
        plan.calibration = _calibration_sequences(checkpoint, tokenizer, source, tensors, calibration_text)
    _check_output_dir(output_dir)
    return plan


def _calibration_sequences(checkpoint, tokenizer: TokenizerFile | None, source: Path, tensors: list[PlannedTensor],
                           text_path: Path | None) -> list[list[int]]:
    from dllama.tokenizer import Tokenizer

    text = calibration.read_calibration_text(text_path)
    if tokenizer is None or not tokenizer.embedded:  # the faithful tokenizer needs the source's embedded
        tokenizer = GGUFTokenizer(checkpoint).tokenizer_file(True) if isinstance(checkpoint, GGUFCheckpoint) \
            else convert_tokenizer(source, embed=True)
    tok = Tokenizer(tokenizer, where=f"the tokenizer of {source}")
    n_params = sum(int(np.prod(t.spec.shape)) for t in tensors if t.spec.float_type == FloatType.Q40)
    return calibration.calibration_sequences(tok.encode(text, add_bos=False), tok.bos_id, n_params)


def _encodes_q40(t: PlannedTensor) -> bool:
    return t.spec.float_type == FloatType.Q40 and not _copies_as_stored(t)


def _copies_as_stored(t: PlannedTensor) -> bool:
    """Same values and block layout (FORMAT.md §1.2): the source's bytes, no second rounding."""
    return t.permute_heads is None and STORED_AS.get(t.entry.dtype) == t.spec.float_type


def _check_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create the output folder {output_dir} ({e.strerror}); choose a writable "
                              "--output-dir") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ConversionError(f"the output folder {output_dir} is not writable; choose a writable --output-dir")


# --------------------------------------------------------------------------------------------
# Writing

Progress = Callable[[int], None]  # called with source bytes done since the last call


def write_outputs(plan: ConversionJob, progress: Progress | None = None) -> ConversionResult:
    """Write the planned files; on any failure no output file (partial or complete) is left."""
    started = time.perf_counter()
    try:
        _write_planned_files(plan, progress or (lambda n: None))
    except OSError as e:  # disk full, I/O error: name the file and the fix
        target = plan.model_path or plan.tokenizer_path
        raise ConversionError(f"writing {target} failed: {e.strerror or e}; free some space or choose another "
                              "--output-dir") from None
    outputs = [p for p in (plan.model_path, plan.tokenizer_path) if p is not None]
    return ConversionResult(plan, time.perf_counter() - started, {p: p.stat().st_size for p in outputs})


def _write_planned_files(plan: ConversionJob, progress: Progress) -> None:
    tokenizer_bytes = plan.tokenizer.to_bytes(with_extension=plan.embed_tokenizer) if plan.tokenizer else None
    if plan.model_path is None:
        with atomic_output(plan.tokenizer_path) as ft:
            ft.write(tokenizer_bytes)
    elif plan.tokenizer_path is None:
        with atomic_output(plan.model_path) as fm:
            _write_model(fm, plan, progress)
    else:
        # the tokenizer is renamed into place only after the model succeeded
        with atomic_output(plan.tokenizer_path) as ft:
            ft.write(tokenizer_bytes)
            with atomic_output(plan.model_path) as fm:
                _write_model(fm, plan, progress)


def _write_model(f, plan: ConversionJob, progress: Progress) -> None:
    stats = None
    if plan.error_aware:  # a tensor copied as stored (Q4_0 from a GGUF) keeps its channels: no fold through it
        copied = {t.spec.hf_name for t in plan.tensors if _copies_as_stored(t)}
        stats = calibration.gather_statistics(open_checkpoint(plan.source), plan.calibration, copied)
    f.write(plan.header.to_bytes())
    out = ReusedBuffer()
    with SourceReader() as reader:
        for t in plan.tensors:
            _write_tensor(f, t, reader, out, progress, stats)


class ReusedBuffer:
    """One growing byte buffer: fresh pages would cost a page fault per 4 KB on every tensor."""

    def __init__(self):
        self._data = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self._data.size < nbytes:
            self._data = np.empty(nbytes, np.uint8)
        return self._data[:nbytes]


class SourceReader:
    """pread-based access to safetensors byte ranges through one reused buffer."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._buffer = ReusedBuffer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, entry: TensorEntry, offset: int, nbytes: int) -> np.ndarray:
        """nbytes of the tensor starting `offset` bytes into it; valid until the next read."""
        data = self._buffer.get(nbytes)
        view = memoryview(data)
        fd = self._fd(entry.file)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], entry.start + offset + done)
            if n <= 0:
                raise ConversionError(f"{entry.file} ended while reading a tensor: the file is truncated; download it "
                                      "again")
            done += n
        self._read_ahead(fd, entry.start + offset + nbytes, nbytes)
        return data

    @staticmethod
    def _read_ahead(fd: int, offset: int, nbytes: int) -> None:
        # let the kernel fetch the next chunk from disk while this one is encoded (cold caches)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self._fds[path]


def _write_tensor(f, t: PlannedTensor, reader: SourceReader, out_buffer: ReusedBuffer, progress: Progress,
                  stats: calibration.ActivationStats | None = None) -> None:
    rows, cols = t.rows_cols
    row_bytes = (t.entry.end - t.entry.start) // rows
    encode, out_dtype = _ENCODERS[t.spec.float_type]
    divided_norm = _divided_norm(stats, t.spec.hf_name) if stats is not None else None
    if stats is not None and t.spec.float_type == FloatType.Q40:
        encode = _search_encoder(stats.column_scale(t.spec.hf_name, cols), stats.importance(t.spec.hf_name, cols))
    elif divided_norm is not None:
        encode = divided_norm
    out_row_bytes = t.spec.nbytes // rows
    copy_as_stored = _copies_as_stored(t) and divided_norm is None
    chunk_rows = _chunk_rows(t, row_bytes)
    for r0 in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - r0)
        raw = reader.read(t.entry, r0 * row_bytes, n * row_bytes)
        if copy_as_stored:  # same values and block layout (FORMAT.md §1.2): no second rounding
            _check_finite(t, *_stored_values(raw, t.entry.dtype, n, cols), r0)
            f.write(memoryview(raw))
        else:
            src, kind = _source_rows(raw, t.entry.dtype, n, cols)
            _check_finite(t, src, kind, r0)
            out = out_buffer.get(n * out_row_bytes)
            encode(src, kind, _row_order(t, n), out.view(out_dtype).reshape(n, -1))
            f.write(memoryview(out))
        progress(n * row_bytes)


def _search_encoder(column_scale: np.ndarray, importance: np.ndarray) -> Callable:
    def encode(src, kind, order, out):
        encoders.encode_q40_search(src, kind, order, column_scale, importance, out)
    return encode


def _divided_norm(stats: calibration.ActivationStats, hf_name: str) -> Callable | None:
    """A norm weight that absorbs its fold's channel scales (calibration.Fold), written as float32 / s."""
    divisor = stats.norm_divisor(hf_name)
    if divisor is None:
        return None

    def encode(src, kind, order, out):
        encoders.encode_f32(src, kind, order, out)
        values = out.view(np.float32)
        values /= divisor
    return encode


def _chunk_rows(t: PlannedTensor, row_bytes: int) -> int:
    rows, _ = t.rows_cols
    chunk = max(1, min(rows, CHUNK_SOURCE_BYTES // row_bytes, CHUNK_VALUES // t.rows_cols[1]))
    if t.permute_heads:  # the rotary permute stays within a head: chunk whole heads
        head_rows = rows // t.permute_heads
        chunk = max(head_rows, chunk // head_rows * head_rows)
    return chunk


def _row_order(t: PlannedTensor, n: int) -> np.ndarray:
    order = np.arange(n, dtype=np.int64)
    if t.permute_heads:
        head_rows = t.rows_cols[0] // t.permute_heads
        order = permute_rotary_rows(order[:, None], n // head_rows)[:, 0].copy()
    return order


def _check_finite(t: PlannedTensor, bits: np.ndarray, kind: int, first_row: int) -> None:
    if encoders.has_nonfinite(bits, kind):
        raise ConversionError(f"{t.entry.file} holds inf or NaN values in {t.spec.hf_name} (rows from {first_row}); "
                              "the checkpoint is corrupt: download it again")


def _stored_values(raw: np.ndarray, dtype: str, n: int, cols: int) -> tuple[np.ndarray, int]:
    """What decides finiteness of bytes copied as stored: the values, or a block type's f16 scales."""
    if dtype in ("Q4_0", "Q8_0"):  # an f16 scale, then the quants (FORMAT.md §1.2): only the scale can be inf
        block_bytes = {"Q4_0": Q40_BYTES, "Q8_0": Q80_BYTES}[dtype]
        return np.ascontiguousarray(raw.reshape(-1, block_bytes)[:, :2]).view("<u2"), encoders.SRC_F16
    return _source_rows(raw, dtype, n, cols)


def _source_rows(raw: np.ndarray, dtype: str, n: int, cols: int) -> tuple[np.ndarray, int]:
    if dtype in ("BF16", "F16"):
        return raw.view("<u2").reshape(n, cols), _SOURCE_KIND[dtype]
    if dtype == "F32":
        return raw.view("<u4").reshape(n, cols), encoders.SRC_F32
    if dtype == "F64":  # rare; narrowing in numpy costs a copy
        return raw.view("<f8").astype(np.float32).view(np.uint32).reshape(n, cols), encoders.SRC_F32
    # a GGUF block type: dequantize with llama.cpp's own gguf.quants, then encode like float32
    return dequantize(raw, dtype, (n, cols)).view(np.uint32), encoders.SRC_F32


# --------------------------------------------------------------------------------------------
# One call for library users and tests

def convert(source: str | os.PathLike, quant: str | FloatType | None, output_dir: str | os.PathLike,
            name: str | None = None,
            with_tokenizer: bool = True, embed_tokenizer: bool = True,
            progress: Progress | None = None, exact: bool = False,
            calibration_text: str | os.PathLike | None = None) -> ConversionResult:
    """Convert a local checkpoint folder or GGUF file; quant None converts only the tokenizer.
    exact: q40 byte-identical to the reference converter instead of the error-aware encoder."""
    source = Path(source)
    float_type = FloatType.parse(quant) if isinstance(quant, str) else quant
    name = name or default_name(str(source.resolve()))
    plan = prepare_conversion(source, float_type, name, Path(output_dir), with_tokenizer, embed_tokenizer, exact,
                              Path(calibration_text) if calibration_text is not None else None)
    return write_outputs(plan, progress)
