"""The tensors of a `.m` file (FORMAT.md §1.3, §3): the tensor plan, its layout, and ModelFile."""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dllama.errors import FormatError
from dllama.formats.codecs import Q40_BLOCK, Q80_BLOCK, FloatType, decode_tensor, tensor_nbytes
from dllama.formats.header import ArchType, ModelHeader, read_model_header


class Split(enum.Enum):
    """How tensor parallelism cuts a tensor across nodes (FORMAT.md §3)."""

    ROWS = "rows"        # each node owns a contiguous block of output rows
    COLUMNS = "columns"  # each node owns a contiguous block of input columns of every row
    WHOLE = "whole"      # every node that needs it holds all of it


@dataclass(frozen=True)
class TensorSpec:
    name: str                     # our name, e.g. "layers.3.q"
    hf_name: str                  # the Hugging Face tensor it comes from
    shape: tuple[int, ...]        # (rows, cols) for matrices, (n,) for vectors
    float_type: FloatType
    split: Split = Split.WHOLE
    permute_heads: int | None = None  # q/k of llama: heads to apply the rotary permute over
    layer: int | None = None
    fallback_hf_name: str | None = None  # lm_head falls back to the embedding when tied/absent

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.float_type)


def tensor_plan(h: ModelHeader) -> list[TensorSpec]:
    """Every tensor of the `.m` file, in file order."""
    W = h.weights_float_type
    f32 = FloatType.F32
    permute = h.arch == ArchType.LLAMA
    plan = [TensorSpec("embedding", "model.embed_tokens.weight", (h.vocab_size, h.dim), f32)]
    for layer in range(h.n_layers):
        p = f"model.layers.{layer}."

        def spec(name: str, hf: str, shape: tuple[int, ...], ft: FloatType = W, split: Split = Split.WHOLE,
                 permute_heads: int | None = None) -> TensorSpec:
            return TensorSpec(f"layers.{layer}.{name}", p + hf, shape, ft, split, permute_heads, layer)

        plan += [
            spec("q", "self_attn.q_proj.weight", (h.q_dim, h.dim), split=Split.ROWS,
                 permute_heads=h.n_heads if permute else None),
            spec("k", "self_attn.k_proj.weight", (h.kv_dim, h.dim), split=Split.ROWS,
                 permute_heads=h.n_kv_heads if permute else None),
            spec("v", "self_attn.v_proj.weight", (h.kv_dim, h.dim), split=Split.ROWS),
            spec("wo", "self_attn.o_proj.weight", (h.dim, h.q_dim), split=Split.COLUMNS),
        ]
        if h.is_moe:
            ffn = h.ffn_dim
            plan.append(spec("gate", "mlp.gate.weight", (h.n_experts, h.dim), f32))
            for e in range(h.n_experts):
                x = f"mlp.experts.{e}."
                plan += [
                    spec(f"experts.{e}.w1", x + "gate_proj.weight", (ffn, h.dim), split=Split.ROWS),
                    spec(f"experts.{e}.w2", x + "down_proj.weight", (h.dim, ffn), split=Split.COLUMNS),
                    spec(f"experts.{e}.w3", x + "up_proj.weight", (ffn, h.dim), split=Split.ROWS),
                ]
        else:
            plan += [
                spec("w1", "mlp.gate_proj.weight", (h.hidden_dim, h.dim), split=Split.ROWS),
                spec("w2", "mlp.down_proj.weight", (h.dim, h.hidden_dim), split=Split.COLUMNS),
                spec("w3", "mlp.up_proj.weight", (h.hidden_dim, h.dim), split=Split.ROWS),
            ]
        if h.has_qk_norm:
            plan += [
                spec("q_norm", "self_attn.q_norm.weight", (h.head_dim,), f32),
                spec("k_norm", "self_attn.k_norm.weight", (h.head_dim,), f32),
            ]
        plan += [
            spec("attn_norm", "input_layernorm.weight", (h.dim,), f32),
            spec("ffn_norm", "post_attention_layernorm.weight", (h.dim,), f32),
        ]
    plan.append(TensorSpec("norm", "model.norm.weight", (h.dim,), f32))
    plan.append(TensorSpec("lm_head", "lm_head.weight", (h.vocab_size, h.dim), W, Split.ROWS,
                           fallback_hf_name="model.embed_tokens.weight"))
    return plan


def permute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotary pairs (i, i + hd/2) -> the reference runtime's adjacent pairs (2i, 2i+1) (§1.3)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@dataclass(frozen=True)
class TensorLayout:
    spec: TensorSpec
    offset: int  # from file start


def tensor_layout(h: ModelHeader) -> list[TensorLayout]:
    offset = h.nbytes
    out = []
    for spec in tensor_plan(h):
        out.append(TensorLayout(spec, offset))
        offset += spec.nbytes
    return out


def model_file_size(h: ModelHeader) -> int:
    """The exact size of the `.m` for this header, from one layer's plan: O(header), whatever n_layers says."""
    specs = tensor_plan(replace(h, n_layers=1))
    per_layer = sum(s.nbytes for s in specs if s.layer is not None)
    return h.nbytes + sum(s.nbytes for s in specs if s.layer is None) + h.n_layers * per_layer


class ModelFile:
    """A memory-mapped `.m` file: header, plan and zero-copy views of each tensor's bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise FormatError(f"model file {self.path} does not exist") from None
        self.header = read_model_header(self.path)
        try:
            expected = model_file_size(self.header)  # before any plan or map: the header is not yet believed
        except FormatError as e:
            raise FormatError(f"model file {self.path} describes impossible tensors ({e}); convert it again") from None
        if size != expected:
            what = "truncated" if size < expected else "longer than its header describes"
            raise FormatError(f"model file {self.path} is {what}: {size} bytes, the header needs exactly {expected}")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.layout = {t.spec.name: t for t in tensor_layout(self.header)}

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes (a view into the map, no copy)."""
        t = self.layout[name]
        return self.data[t.offset:t.offset + t.spec.nbytes]

    def blocks(self, name: str) -> np.ndarray:
        """Stored bytes viewed as (rows, blocks-per-row) records for q40/q80, or a float array."""
        t = self.layout[name]
        spec = t.spec
        raw = self.raw(name)
        if spec.float_type == FloatType.Q40:
            return raw.view(Q40_BLOCK).reshape(spec.shape[0], -1) if len(spec.shape) == 2 else raw.view(Q40_BLOCK)
        if spec.float_type == FloatType.Q80:
            return raw.view(Q80_BLOCK).reshape(spec.shape[0], -1) if len(spec.shape) == 2 else raw.view(Q80_BLOCK)
        dtype = "<f4" if spec.float_type == FloatType.F32 else "<f2"
        return raw.view(dtype).reshape(spec.shape)

    def rows(self, name: str) -> "FileRows":
        """A float tensor's rows, read from the file on each lookup instead of through the map (FileRows)."""
        t = self.layout[name]
        if t.spec.float_type not in (FloatType.F32, FloatType.F16):
            raise FormatError(f"{name} is {t.spec.float_type.name}: rows are read only from float tensors")
        return FileRows(self.path, t.offset, t.spec.shape, "<f4" if t.spec.float_type == FloatType.F32 else "<f2")

    def tensor(self, name: str) -> np.ndarray:
        """The tensor decoded to float32 (a copy; for tests and the validator, not the runtime)."""
        spec = self.layout[name].spec
        return decode_tensor(self.raw(name), spec.float_type, spec.shape)

    @property
    def names(self) -> list[str]:
        return list(self.layout)


class FileRows:
    """A 2-D tensor whose rows are read with pread when looked up: `rows[token]` -> (cols,), `rows[ids]` ->
    (len(ids), cols), copies, as numpy's fancy indexing gives. For the embedding, of which a node reads one row
    per token: through the map, Linux 6.x maps the page cache's large folio around a touched row whole (~2 MiB
    for an 8 KiB row), so a few hundred distinct tokens made all of TinyLlama's 250 MiB embedding resident in
    the process (226 MiB after 4 x 128 generated tokens). Read, a row costs the process its own bytes; the
    file's pages stay in the page cache, shared and reclaimable."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: str):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, np.dtype(dtype)
        self.row_bytes = shape[1] * self.dtype.itemsize
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if np.ndim(index) == 0:
            return self._read(np.asarray([index]))[0]
        return self._read(np.asarray(index).reshape(-1))

    def _read(self, ids: np.ndarray) -> np.ndarray:
        outside = ids[(ids < -self.shape[0]) | (ids >= self.shape[0])]
        if outside.size:
            raise IndexError(f"row {int(outside[0])} is out of range for {self.shape[0]} rows")
        out = np.empty((ids.size, self.shape[1]), self.dtype)
        for row, i in zip(out, ids.tolist()):
            os.preadv(self._fd, [row], self.offset + (i % self.shape[0]) * self.row_bytes)
        return out

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
