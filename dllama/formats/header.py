"""The `.m` header (FORMAT.md §1, §1.1): keys, their order, and the ModelHeader they describe."""
from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

from dllama.errors import FormatError
from dllama.formats.codecs import FloatType

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
# required keys that ModelHeader can default when an old or foreign file lacks them
DEFAULTED_KEYS = (HeaderKey.N_EXPERTS, HeaderKey.N_ACTIVE_EXPERTS, HeaderKey.VERSION, HeaderKey.HIDDEN_ACT)
NORM_EPSILON_CODES = {5: 1e-5, 6: 1e-6}

# What a reader believes before it plans, allocates or loops: each size field's smallest and largest
# value (issue 28). Far beyond any released model (Llama 3.1 405B: dim 16384, 126 layers, vocabulary
# 128256; Qwen3 MoE: 128 experts), yet small enough that a plan over them is O(header), and a
# file claiming more is refused before a tensor plan of 2^31 layers is built.
HEADER_LIMITS = {
    "dim": (1, 1 << 17), "hidden_dim": (1, 1 << 20), "n_layers": (1, 1 << 12), "n_heads": (1, 1 << 12),
    "n_kv_heads": (1, 1 << 12), "vocab_size": (1, 1 << 22), "max_seq_len": (1, 1 << 24),
    "n_experts": (0, 1 << 10), "n_active_experts": (0, 1 << 10), "head_dim_value": (1, 1 << 14),
    "moe_hidden_dim": (1, 1 << 20),
}


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
        values = {key: getattr(self, name) for key, name in FIELD_BY_KEY.items()}
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


# header key <-> ModelHeader field, both ways (enum fields are stored as their int)
FIELD_BY_KEY = {
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
        raise FormatError(f"{where} uses the old distributed-llama format (magic {magic:#x}); reconvert it with "
                          "dllama-convert")
    if magic != MODEL_MAGIC:
        raise FormatError(f"{where} is not a distributed-llama model: bad magic {magic & 0xFFFFFFFF:#x} (expected "
                          f"{MODEL_MAGIC:#x})")
    if header_size < 8 or (header_size - 8) % 8 or header_size > 8 + 8 * 64:
        raise FormatError(f"{where} has an impossible header size {header_size}")
    if len(data) < header_size:
        raise FormatError(f"{where} is truncated inside its header ({len(data)} of {header_size} bytes)")
    n_pairs = (header_size - 8) // 8
    values = struct.unpack_from(f"<{2 * n_pairs}i", data, 8)
    fields: dict[str, object] = {}
    for key, value in zip(values[0::2], values[1::2]):
        try:
            name = FIELD_BY_KEY[HeaderKey(key)]
        except ValueError:
            raise FormatError(f"{where} has unknown header key {key}; it was written by a newer or foreign "
                              "converter") from None
        if name in _ENUM_FIELDS:
            try:
                value = _ENUM_FIELDS[name](value)
            except ValueError:
                raise FormatError(f"{where} has unsupported {name} {value:#x}") from None
        fields[name] = value
    missing = [FIELD_BY_KEY[k] for k in REQUIRED_KEY_ORDER if k not in DEFAULTED_KEYS and FIELD_BY_KEY[k] not in fields]
    if missing:
        raise FormatError(f"{where} header lacks {', '.join(missing)}")
    code = fields.get("norm_epsilon_code")
    if code is not None and code not in NORM_EPSILON_CODES:
        raise FormatError(f"{where} has unsupported norm_epsilon code {code} (only 5 and 6 exist)")
    check_header_limits(fields, where)
    header = ModelHeader(**fields)  # type: ignore[arg-type]
    if header.head_dim < 1:
        raise FormatError(f"{where} has {header.n_heads} heads for dim {header.dim}: no head is a whole value wide; "
                          "the file is corrupt: convert it again")
    return header


def check_header_limits(fields: dict[str, object], where: str) -> None:
    """Each size field within HEADER_LIMITS, so that plans and allocations from it stay bounded."""
    for name, (low, high) in HEADER_LIMITS.items():
        value = fields.get(name)
        if value is not None and not low <= value <= high:
            raise FormatError(f"{where} has {name} {value} in its header, outside {low}..{high}; the file is "
                              "corrupt or not a distributed-llama model: convert it again")


def read_model_header(path: str | os.PathLike) -> ModelHeader:
    with open(path, "rb") as f:
        head = f.read(8 + 8 * 64)
    return parse_model_header(head, where=str(path))
