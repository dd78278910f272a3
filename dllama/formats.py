"""The one owner of the distributed-llama file formats (../shared/FORMAT.md, docs/FORMAT.md).

Everything that reads or writes `.m` / `.t` bytes goes through this module: header keys and
their order, the tensor plan, the q40/q80/f16/f32 block codecs, and the `.t` layout with our
optional extension. Converter, tokenizer, runtime and validator import these tables; nobody
repeats a magic number.
"""
from __future__ import annotations

import enum
import io
import os
import struct
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np


class FormatError(ValueError):
    """A `.m` or `.t` file (or a value headed for one) breaks the format."""


# --------------------------------------------------------------------------------------------
# Float types and block codecs (FORMAT.md §1.2)

class FloatType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q40 = 2
    Q80 = 3

    @classmethod
    def parse(cls, name: str) -> "FloatType":
        try:
            return cls[name.upper()]
        except KeyError:
            raise FormatError(f"unknown float type {name!r}: use one of f32, f16, q40, q80") from None


@dataclass(frozen=True)
class BlockFormat:
    values: int  # values per block
    nbytes: int  # bytes per block


BLOCK_SIZE = 32
BLOCK_FORMATS = {
    FloatType.F32: BlockFormat(values=1, nbytes=4),
    FloatType.F16: BlockFormat(values=1, nbytes=2),
    FloatType.Q40: BlockFormat(values=BLOCK_SIZE, nbytes=2 + BLOCK_SIZE // 2),
    FloatType.Q80: BlockFormat(values=BLOCK_SIZE, nbytes=2 + BLOCK_SIZE),
}

# numpy record views of one block, for kernels and readers that want the fields
Q40_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK_SIZE // 2,))])
Q80_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK_SIZE,))])


def tensor_nbytes(shape: tuple[int, ...], float_type: FloatType) -> int:
    n = int(np.prod(shape))
    fmt = BLOCK_FORMATS[float_type]
    if n % fmt.values:
        raise FormatError(f"{n} values do not fill whole {float_type.name.lower()} blocks of {fmt.values}")
    return n // fmt.values * fmt.nbytes


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """Reference q40 quantizer, byte-exact with the distributed-llama converter. Returns uint8 bytes."""
    blocks = _as_blocks(x)
    mx = blocks.max(axis=1)
    mn = blocks.min(axis=1)
    # the signed value of largest magnitude; a tie |min| == max takes max
    m = np.where(-mn > mx, mn, mx).astype(np.float32)
    d = (m / np.float32(-8.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = blocks * inv[:, None] + np.float32(8.5)
    q = np.clip(q, np.float32(0.0), np.float32(15.0)).astype(np.uint8)  # astype truncates
    out = np.empty(len(blocks), dtype=Q40_BLOCK)
    out["d"] = d.astype(np.float16)
    out["qs"] = q[:, :16] | (q[:, 16:] << 4)
    return out.view(np.uint8)


def dequantize_q40(data: np.ndarray, n: int | None = None) -> np.ndarray:
    blocks = np.frombuffer(memoryview(data), dtype=Q40_BLOCK)
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - np.float32(8.0)
    out = (q * blocks["d"].astype(np.float32)[:, None]).reshape(-1)
    return out if n is None else out[:n]


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """Reference q80 quantizer, byte-exact with the distributed-llama converter. Returns uint8 bytes."""
    blocks = _as_blocks(x)
    amax = np.abs(blocks).max(axis=1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.rint(blocks * inv[:, None])  # round half to even
    out = np.empty(len(blocks), dtype=Q80_BLOCK)
    out["d"] = d.astype(np.float16)
    out["qs"] = q.astype(np.int8)
    return out.view(np.uint8)


def dequantize_q80(data: np.ndarray, n: int | None = None) -> np.ndarray:
    blocks = np.frombuffer(memoryview(data), dtype=Q80_BLOCK)
    out = (blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)
    return out if n is None else out[:n]


def encode_tensor(x: np.ndarray, float_type: FloatType) -> np.ndarray:
    """float32 values -> the bytes of `float_type` (row-major, blocks along the last axis)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if float_type == FloatType.F32:
        return x.reshape(-1).view(np.uint8)
    if float_type == FloatType.F16:
        return x.reshape(-1).astype("<f2").view(np.uint8)
    if float_type == FloatType.Q40:
        return quantize_q40(x)
    if float_type == FloatType.Q80:
        return quantize_q80(x)
    raise FormatError(f"cannot encode {float_type!r}")


def decode_tensor(data: np.ndarray | bytes, float_type: FloatType, shape: tuple[int, ...]) -> np.ndarray:
    """The bytes of `float_type` -> float32 values of `shape`."""
    raw = np.frombuffer(memoryview(data), dtype=np.uint8)
    if float_type == FloatType.F32:
        flat = raw.view("<f4").astype(np.float32, copy=False)
    elif float_type == FloatType.F16:
        flat = raw.view("<f2").astype(np.float32)
    elif float_type == FloatType.Q40:
        flat = dequantize_q40(raw)
    elif float_type == FloatType.Q80:
        flat = dequantize_q80(raw)
    else:
        raise FormatError(f"cannot decode {float_type!r}")
    return flat.reshape(shape)


def _as_blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape and x.shape[-1] % BLOCK_SIZE:
        raise FormatError(f"row length {x.shape[-1]} is not a multiple of {BLOCK_SIZE}, so it cannot be block-quantized")
    return x.reshape(-1, BLOCK_SIZE)


# --------------------------------------------------------------------------------------------
# Model file header (FORMAT.md §1, §1.1)

MODEL_MAGIC = 0x0A00ABCD
OLD_MODEL_MAGICS = (0xABCD00, 0xABCD01)


class ArchType(enum.IntEnum):
    LLAMA = 0xABCD00
    QWEN3 = 0xABCD01
    QWEN3_MOE = 0xABCD02


class HiddenAct(enum.IntEnum):
    GELU = 0
    SILU = 1


class RopeType(enum.IntEnum):
    LLAMA = 0
    FALCON = 1
    LLAMA3_1 = 2


class HeaderKey(enum.IntEnum):
    VERSION = 0
    ARCH_TYPE = 1
    DIM = 2
    HIDDEN_DIM = 3
    N_LAYERS = 4
    N_HEADS = 5
    N_KV_HEADS = 6
    N_EXPERTS = 7
    N_ACTIVE_EXPERTS = 8
    VOCAB_SIZE = 9
    MAX_SEQ_LEN = 10
    HIDDEN_ACT = 11
    ROPE_THETA = 12
    WEIGHTS_FLOAT_TYPE = 13
    ROPE_SCALING_FACTOR = 14
    ROPE_SCALING_LOW_FREQ_FACTOR = 15
    ROPE_SCALING_HIGH_FREQ_FACTOR = 16
    ROPE_SCALING_ORIG_MAX_SEQ_LEN = 17
    ROPE_TYPE = 18
    HEAD_DIM = 19
    NORM_EPSILON = 20
    MOE_HIDDEN_DIM = 21


# The reference converter's key order; optional keys are written only when present (§1.1).
REQUIRED_KEY_ORDER = (
    HeaderKey.VERSION, HeaderKey.ARCH_TYPE, HeaderKey.HIDDEN_ACT, HeaderKey.DIM, HeaderKey.HIDDEN_DIM,
    HeaderKey.N_LAYERS, HeaderKey.N_HEADS, HeaderKey.N_KV_HEADS, HeaderKey.WEIGHTS_FLOAT_TYPE,
    HeaderKey.MAX_SEQ_LEN, HeaderKey.VOCAB_SIZE, HeaderKey.N_EXPERTS, HeaderKey.N_ACTIVE_EXPERTS,
)
OPTIONAL_KEY_ORDER = (
    HeaderKey.ROPE_THETA,
    HeaderKey.ROPE_SCALING_FACTOR, HeaderKey.ROPE_SCALING_LOW_FREQ_FACTOR,
    HeaderKey.ROPE_SCALING_HIGH_FREQ_FACTOR, HeaderKey.ROPE_SCALING_ORIG_MAX_SEQ_LEN, HeaderKey.ROPE_TYPE,
    HeaderKey.HEAD_DIM, HeaderKey.NORM_EPSILON, HeaderKey.MOE_HIDDEN_DIM,
)
NORM_EPSILON_CODES = {5: 1e-5, 6: 1e-6}


@dataclass(frozen=True)
class ModelHeader:
    """The `.m` header: the model's shape and numerics. Optional fields are None when absent."""

    arch: ArchType
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    weights_float_type: FloatType
    hidden_act: HiddenAct = HiddenAct.SILU
    n_experts: int = 0
    n_active_experts: int = 0
    version: int = 0
    rope_theta: int | None = None
    rope_scaling_factor: int | None = None
    rope_scaling_low_freq_factor: int | None = None
    rope_scaling_high_freq_factor: int | None = None
    rope_scaling_orig_max_seq_len: int | None = None
    rope_type: RopeType | None = None
    head_dim_value: int | None = None
    norm_epsilon_code: int | None = None
    moe_hidden_dim: int | None = None

    # -- derived values, as the reference runtime derives them
    @property
    def head_dim(self) -> int:
        return self.head_dim_value if self.head_dim_value else self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.head_dim * self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    @property
    def norm_epsilon(self) -> float:
        return NORM_EPSILON_CODES[self.norm_epsilon_code] if self.norm_epsilon_code else 1e-5

    @property
    def theta(self) -> float:
        return float(self.rope_theta) if self.rope_theta is not None else 10000.0

    @property
    def effective_rope_type(self) -> RopeType:
        # the reader forces falcon rope for qwen3 whatever the header says (§1.1)
        if self.arch in (ArchType.QWEN3, ArchType.QWEN3_MOE):
            return RopeType.FALCON
        return self.rope_type if self.rope_type is not None else RopeType.LLAMA

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def ffn_dim(self) -> int:
        """Hidden size of one FFN (an expert's for MoE)."""
        return self.moe_hidden_dim if self.is_moe and self.moe_hidden_dim else self.hidden_dim

    @property
    def has_qk_norm(self) -> bool:
        return self.arch in (ArchType.QWEN3, ArchType.QWEN3_MOE)

    def key_values(self) -> list[tuple[int, int]]:
        """(key, value) pairs in the reference converter's order."""
        values = {
            HeaderKey.VERSION: self.version, HeaderKey.ARCH_TYPE: int(self.arch),
            HeaderKey.HIDDEN_ACT: int(self.hidden_act), HeaderKey.DIM: self.dim,
            HeaderKey.HIDDEN_DIM: self.hidden_dim, HeaderKey.N_LAYERS: self.n_layers,
            HeaderKey.N_HEADS: self.n_heads, HeaderKey.N_KV_HEADS: self.n_kv_heads,
            HeaderKey.WEIGHTS_FLOAT_TYPE: int(self.weights_float_type),
            HeaderKey.MAX_SEQ_LEN: self.max_seq_len, HeaderKey.VOCAB_SIZE: self.vocab_size,
            HeaderKey.N_EXPERTS: self.n_experts, HeaderKey.N_ACTIVE_EXPERTS: self.n_active_experts,
            HeaderKey.ROPE_THETA: self.rope_theta,
            HeaderKey.ROPE_SCALING_FACTOR: self.rope_scaling_factor,
            HeaderKey.ROPE_SCALING_LOW_FREQ_FACTOR: self.rope_scaling_low_freq_factor,
            HeaderKey.ROPE_SCALING_HIGH_FREQ_FACTOR: self.rope_scaling_high_freq_factor,
            HeaderKey.ROPE_SCALING_ORIG_MAX_SEQ_LEN: self.rope_scaling_orig_max_seq_len,
            HeaderKey.ROPE_TYPE: None if self.rope_type is None else int(self.rope_type),
            HeaderKey.HEAD_DIM: self.head_dim_value,
            HeaderKey.NORM_EPSILON: self.norm_epsilon_code,
            HeaderKey.MOE_HIDDEN_DIM: self.moe_hidden_dim,
        }
        pairs = [(int(k), int(values[k])) for k in REQUIRED_KEY_ORDER]
        pairs += [(int(k), int(values[k])) for k in OPTIONAL_KEY_ORDER if values[k] is not None]
        return pairs

    def to_bytes(self) -> bytes:
        pairs = self.key_values()
        header_size = 8 + 8 * len(pairs)
        return struct.pack(f"<2i{2 * len(pairs)}i", MODEL_MAGIC, header_size, *[v for p in pairs for v in p])

    @property
    def nbytes(self) -> int:
        return 8 + 8 * len(self.key_values())


_FIELD_BY_KEY = {
    HeaderKey.VERSION: "version", HeaderKey.ARCH_TYPE: "arch", HeaderKey.DIM: "dim",
    HeaderKey.HIDDEN_DIM: "hidden_dim", HeaderKey.N_LAYERS: "n_layers", HeaderKey.N_HEADS: "n_heads",
    HeaderKey.N_KV_HEADS: "n_kv_heads", HeaderKey.N_EXPERTS: "n_experts",
    HeaderKey.N_ACTIVE_EXPERTS: "n_active_experts", HeaderKey.VOCAB_SIZE: "vocab_size",
    HeaderKey.MAX_SEQ_LEN: "max_seq_len", HeaderKey.HIDDEN_ACT: "hidden_act",
    HeaderKey.ROPE_THETA: "rope_theta", HeaderKey.WEIGHTS_FLOAT_TYPE: "weights_float_type",
    HeaderKey.ROPE_SCALING_FACTOR: "rope_scaling_factor",
    HeaderKey.ROPE_SCALING_LOW_FREQ_FACTOR: "rope_scaling_low_freq_factor",
    HeaderKey.ROPE_SCALING_HIGH_FREQ_FACTOR: "rope_scaling_high_freq_factor",
    HeaderKey.ROPE_SCALING_ORIG_MAX_SEQ_LEN: "rope_scaling_orig_max_seq_len",
    HeaderKey.ROPE_TYPE: "rope_type", HeaderKey.HEAD_DIM: "head_dim_value",
    HeaderKey.NORM_EPSILON: "norm_epsilon_code", HeaderKey.MOE_HIDDEN_DIM: "moe_hidden_dim",
}
_ENUM_FIELDS = {"arch": ArchType, "hidden_act": HiddenAct, "weights_float_type": FloatType, "rope_type": RopeType}


def parse_model_header(data: bytes, where: str = "model file") -> ModelHeader:
    """Parse the header at the start of `data` (at least the header's bytes)."""
    if len(data) < 8:
        raise FormatError(f"{where} is truncated: {len(data)} bytes, too short for a header")
    magic, header_size = struct.unpack_from("<2i", data)
    if magic in OLD_MODEL_MAGICS:
        raise FormatError(f"{where} uses the old distributed-llama format (magic {magic:#x}); reconvert it with dllama-convert")
    if magic != MODEL_MAGIC:
        raise FormatError(f"{where} is not a distributed-llama model: bad magic {magic & 0xFFFFFFFF:#x} (expected {MODEL_MAGIC:#x})")
    if header_size < 8 or (header_size - 8) % 8 or header_size > 8 + 8 * 64:
        raise FormatError(f"{where} has an impossible header size {header_size}")
    if len(data) < header_size:
        raise FormatError(f"{where} is truncated inside its header ({len(data)} of {header_size} bytes)")
    n_pairs = (header_size - 8) // 8
    values = struct.unpack_from(f"<{2 * n_pairs}i", data, 8)
    fields: dict[str, object] = {}
    for key, value in zip(values[0::2], values[1::2]):
        try:
            name = _FIELD_BY_KEY[HeaderKey(key)]
        except ValueError:
            raise FormatError(f"{where} has unknown header key {key}; it was written by a newer or foreign converter") from None
        if name in _ENUM_FIELDS:
            try:
                value = _ENUM_FIELDS[name](value)
            except ValueError:
                raise FormatError(f"{where} has unsupported {name} {value:#x}") from None
        fields[name] = value
    required = [_FIELD_BY_KEY[k] for k in REQUIRED_KEY_ORDER if k not in (HeaderKey.N_EXPERTS, HeaderKey.N_ACTIVE_EXPERTS, HeaderKey.VERSION, HeaderKey.HIDDEN_ACT)]
    missing = [name for name in required if name not in fields]
    if missing:
        raise FormatError(f"{where} header lacks {', '.join(missing)}")
    code = fields.get("norm_epsilon_code")
    if code is not None and code not in NORM_EPSILON_CODES:
        raise FormatError(f"{where} has unsupported norm_epsilon code {code} (only 5 and 6 exist)")
    return ModelHeader(**fields)  # type: ignore[arg-type]


def read_model_header(path: str | os.PathLike) -> ModelHeader:
    with open(path, "rb") as f:
        head = f.read(8 + 8 * 64)
    return parse_model_header(head, where=str(path))


# --------------------------------------------------------------------------------------------
# Tensor plan (FORMAT.md §1.3, §3)

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
    for l in range(h.n_layers):
        p = f"model.layers.{l}."

        def spec(name: str, hf: str, shape: tuple[int, ...], ft: FloatType = W, split: Split = Split.WHOLE,
                 permute_heads: int | None = None) -> TensorSpec:
            return TensorSpec(f"layers.{l}.{name}", p + hf, shape, ft, split, permute_heads, l)

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
    return h.nbytes + sum(s.nbytes for s in tensor_plan(h))


class ModelFile:
    """A memory-mapped `.m` file: header, plan and zero-copy views of each tensor's bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise FormatError(f"model file {self.path} does not exist") from None
        self.header = read_model_header(self.path)
        expected = model_file_size(self.header)
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

    def tensor(self, name: str) -> np.ndarray:
        """The tensor decoded to float32 (a copy; for tests and the validator, not the runtime)."""
        spec = self.layout[name].spec
        return decode_tensor(self.raw(name), spec.float_type, spec.shape)

    @property
    def names(self) -> list[str]:
        return list(self.layout)


# --------------------------------------------------------------------------------------------
# Tokenizer file (FORMAT.md §4) and our extension (docs/FORMAT.md)

TOKENIZER_MAGIC = 0x567124
OLD_TOKENIZER_MAGIC = 0x567123


class TokKey(enum.IntEnum):
    VERSION = 0
    VOCAB_SIZE = 1
    MAX_TOKEN_LENGTH = 2
    BOS_ID = 3
    EOS_ID = 4
    PAD_ID = 5
    CHAT_EOS_ID = 6
    CHAT_TEMPLATE = 7
    CHAT_STOP = 8
    N_EOS_TOKENS = 9
    ADD_BOS = 10


def padded_vocabulary(model_vocab: int, tokenizer_vocab: int) -> bool:
    """A tokenizer smaller than the model's embedding, as in checkpoints that pad it (Qwen3: 151936
    rows, 151669 tokens): the extra rows are never produced and the reference runtime only notes it.
    A tokenizer larger than the embedding, or under half of it, belongs to another model."""
    return model_vocab // 2 <= tokenizer_vocab < model_vocab


EXTENSION_MAGIC = b"DLXT"
EXTENSION_VERSION = 1


class EmbeddedKind(enum.IntEnum):
    """What an extension section after the vocabulary carries."""

    TOKENIZER_JSON = 1     # Hugging Face tokenizer.json (utf-8)
    SENTENCEPIECE = 2      # sentencepiece tokenizer.model (serialized ModelProto)
    TOKENIZER_CONFIG = 3   # tokenizer_config.json (utf-8), for special-token flags


@dataclass(frozen=True)
class EmbeddedSource:
    kind: EmbeddedKind
    data: bytes


@dataclass
class TokenizerFile:
    """Everything a `.t` holds. `tokens[i]` are raw bytes, `scores[i]` float32."""

    tokens: list[bytes]
    scores: list[float]
    bos_id: int
    eos_ids: list[int]
    chat_template: str | None = None
    add_bos: bool = True
    version: int = 1
    max_token_length: int | None = None
    embedded: list[EmbeddedSource] = field(default_factory=list)
    # keys the reference also reads but our converter does not write
    legacy_eos_id: int | None = None
    pad_id: int | None = None
    chat_eos_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def embedded_source(self, kind: EmbeddedKind) -> bytes | None:
        for section in self.embedded:
            if section.kind == kind:
                return section.data
        return None

    def to_bytes(self, with_extension: bool = True) -> bytes:
        buf = io.BytesIO()
        self.write(buf, with_extension=with_extension)
        return buf.getvalue()

    def write(self, f: BinaryIO, with_extension: bool = True) -> None:
        if len(self.scores) != len(self.tokens):
            raise FormatError(f"{len(self.tokens)} tokens but {len(self.scores)} scores")
        for i, tok in enumerate(self.tokens):
            if not tok:
                raise FormatError(f"token {i} is empty; the format needs at least one byte per token")
        template = self.chat_template.encode("utf-8") if self.chat_template else b""
        max_len = self.max_token_length or max(len(t) for t in self.tokens)
        pairs = [
            (TokKey.BOS_ID, self.bos_id), (TokKey.VERSION, self.version),
            (TokKey.VOCAB_SIZE, self.vocab_size), (TokKey.MAX_TOKEN_LENGTH, max_len),
        ]
        if template:
            pairs.append((TokKey.CHAT_TEMPLATE, len(template)))
        pairs += [(TokKey.N_EOS_TOKENS, len(self.eos_ids)), (TokKey.ADD_BOS, int(self.add_bos))]
        f.write(struct.pack("<2i", TOKENIZER_MAGIC, 8 + 8 * len(pairs)))
        f.write(struct.pack(f"<{2 * len(pairs)}i", *[int(v) for p in pairs for v in p]))
        f.write(template)
        f.write(struct.pack(f"<{len(self.eos_ids)}i", *self.eos_ids))
        records = bytearray()
        for tok, score in zip(self.tokens, self.scores):
            records += struct.pack("<fI", score, len(tok)) + tok
        f.write(records)
        if with_extension:
            for section in self.embedded:
                f.write(_extension_section(section))


def _extension_section(section: EmbeddedSource) -> bytes:
    packed = zlib.compress(section.data, 6)
    return (EXTENSION_MAGIC + struct.pack("<5I", EXTENSION_VERSION, int(section.kind), 1, len(section.data), len(packed))
            + struct.pack("<I", zlib.crc32(section.data)) + packed)


_EXT_HEADER = struct.Struct("<4s6I")  # magic, version, kind, compression, raw_len, stored_len, crc32


def parse_tokenizer(data: bytes, where: str = "tokenizer file") -> TokenizerFile:
    if len(data) < 8:
        raise FormatError(f"{where} is truncated: {len(data)} bytes, too short for a header")
    magic, header_size = struct.unpack_from("<2i", data)
    if magic not in (TOKENIZER_MAGIC, OLD_TOKENIZER_MAGIC):
        raise FormatError(f"{where} is not a distributed-llama tokenizer: bad magic {magic & 0xFFFFFFFF:#x} (expected {TOKENIZER_MAGIC:#x})")
    if header_size < 8 or (header_size - 8) % 8 or header_size > 8 + 8 * 64 or header_size > len(data):
        raise FormatError(f"{where} has an impossible or truncated header (size {header_size})")
    n_pairs = (header_size - 8) // 8
    values = struct.unpack_from(f"<{2 * n_pairs}i", data, 8)
    keys: dict[int, int] = {}
    for key, value in zip(values[0::2], values[1::2]):
        if key not in TokKey.__members__.values():
            raise FormatError(f"{where} has unknown header key {key}")
        keys[key] = value
    if keys.get(TokKey.VERSION) != 1:
        raise FormatError(f"{where} has tokenizer version {keys.get(TokKey.VERSION)}; only version 1 exists")
    vocab_size = keys.get(TokKey.VOCAB_SIZE, 0)
    if vocab_size <= 0:
        raise FormatError(f"{where} has vocab_size {vocab_size}")
    pos = header_size
    template = None
    if TokKey.CHAT_TEMPLATE in keys:
        n = keys[TokKey.CHAT_TEMPLATE]
        if n < 0 or pos + n > len(data):
            raise FormatError(f"{where} is truncated inside its chat template")
        template = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
    n_eos = keys.get(TokKey.N_EOS_TOKENS, 0)
    if n_eos < 0 or pos + 4 * n_eos > len(data):
        raise FormatError(f"{where} is truncated inside its eos list")
    eos_ids = list(struct.unpack_from(f"<{n_eos}i", data, pos))
    pos += 4 * n_eos
    tokens: list[bytes] = []
    scores: list[float] = []
    for i in range(vocab_size):
        if pos + 8 > len(data):
            raise FormatError(f"{where} is truncated: vocabulary ends after {i} of {vocab_size} tokens")
        score, length = struct.unpack_from("<fI", data, pos)
        pos += 8
        if length == 0:
            raise FormatError(f"{where} has token {i} of length 0; the file is corrupt")
        if pos + length > len(data):
            raise FormatError(f"{where} is truncated inside token {i} of {vocab_size}")
        tokens.append(bytes(data[pos:pos + length]))
        scores.append(score)
        pos += length
    bos_id = keys.get(TokKey.BOS_ID, -1)
    for name, tid in [("bos_id", bos_id)] + [("eos id", e) for e in eos_ids]:
        if not 0 <= tid < vocab_size:
            raise FormatError(f"{where} has {name} {tid} outside the vocabulary of {vocab_size} tokens")
    return TokenizerFile(
        tokens=tokens, scores=scores, bos_id=bos_id, eos_ids=eos_ids, chat_template=template,
        add_bos=bool(keys.get(TokKey.ADD_BOS, 1)), version=keys[TokKey.VERSION],
        max_token_length=keys.get(TokKey.MAX_TOKEN_LENGTH), embedded=_parse_extension(data, pos, where),
        legacy_eos_id=keys.get(TokKey.EOS_ID), pad_id=keys.get(TokKey.PAD_ID), chat_eos_id=keys.get(TokKey.CHAT_EOS_ID),
    )


def vocabulary_end(data: bytes) -> int:
    """Offset where the reference reader stops: the extension (if any) starts here."""
    tf = parse_tokenizer(data)
    return len(tf.to_bytes(with_extension=False))


def _parse_extension(data: bytes, pos: int, where: str) -> list[EmbeddedSource]:
    sections = []
    while pos < len(data):
        if len(data) - pos < _EXT_HEADER.size:
            raise FormatError(f"{where} has {len(data) - pos} stray bytes after the vocabulary")
        magic, version, kind, compression, raw_len, stored_len, crc = _EXT_HEADER.unpack_from(data, pos)
        if magic != EXTENSION_MAGIC:
            raise FormatError(f"{where} has unknown data after the vocabulary (no {EXTENSION_MAGIC!r} extension magic)")
        if version != EXTENSION_VERSION:
            raise FormatError(f"{where} has extension version {version}; this dllama reads version {EXTENSION_VERSION}")
        pos += _EXT_HEADER.size
        if pos + stored_len > len(data):
            raise FormatError(f"{where} is truncated inside its embedded tokenizer")
        stored = bytes(data[pos:pos + stored_len])
        pos += stored_len
        raw = zlib.decompress(stored) if compression == 1 else stored
        if len(raw) != raw_len or zlib.crc32(raw) != crc:
            raise FormatError(f"{where} has a corrupt embedded tokenizer (length or checksum mismatch)")
        try:
            sections.append(EmbeddedSource(EmbeddedKind(kind), raw))
        except ValueError:
            pass  # a newer kind we cannot use: skip it, as the reference skips all of them
    return sections


def read_tokenizer(path: str | os.PathLike) -> TokenizerFile:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FormatError(f"tokenizer file {path} does not exist") from None
    return parse_tokenizer(data, where=str(path))


# --------------------------------------------------------------------------------------------
# Writing without leaving half-written files behind

@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path`, rename it over `path` only on success."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise FormatError(f"cannot write to {path.parent}: {e.strerror}; choose a writable --output-dir") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
