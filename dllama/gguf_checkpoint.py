"""GGUF files (llama.cpp's format) as a checkpoint: metadata -> config, tensors by Hugging Face name.

The `gguf` package (llama.cpp's own gguf-py) owns the format's tables (value types, tensor types
and their block sizes) and dequantizes (`gguf.quants`). Its GGUFReader, though, builds a numpy
view per metadata value: SmolLM2's 98k vocabulary strings cost it 170 MB and 5 s, more than the
whole conversion. So `GGUFFile` walks the header, metadata and tensor infos with `struct` into
plain Python values, against gguf's tables (tests check it against GGUFReader field for field).

`GGUFCheckpoint` answers like
`checkpoint.Checkpoint` (config, entries, get) so the converter and the validator take either:
- `config` is a config.json-style dict built from the `{arch}.*` metadata;
- `entries` maps Hugging Face tensor names to byte ranges of the file, in the tensor's stored
  type (`TensorEntry.dtype` is the GGML type name: "F32", "Q4_0", "Q6_K", ...);
- `get(name)` dequantizes with `gguf.quants` and returns the Hugging Face layout.

llama.cpp stores llama q/k rows permuted for its rotary pairs exactly as FORMAT.md §1.3 wants
them (convert_hf_to_gguf.py `LlamaModel.permute` is our `permute_rotary_rows`), so GGUF rows go
to the `.m` as they are; `get` undoes the permute to give the Hugging Face rows.
"""
from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllama.checkpoint import CheckpointError, TensorEntry, widen_to_float32
from dllama.formats import HEADER_LIMITS, FloatType, ModelHeader, tensor_plan


class GGUFError(CheckpointError):
    """The GGUF file is unreadable or holds something dllama cannot convert."""


# GGUF general.architecture -> config.json model_type
MODEL_TYPE_BY_ARCH = {"llama": "llama", "mistral": "mistral", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}

# Hugging Face tensor name -> GGUF tensor name (llama.cpp gguf-py/gguf/tensor_mapping.py)
_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
_HF_BY_GGUF_GLOBAL = {g: h for h, g in _GLOBAL_NAMES.items()}
_HF_BY_GGUF_LAYER = {g: h for h, g in _LAYER_NAMES.items()}
_HF_BY_GGUF_EXPERTS = {g: h for h, g in _EXPERT_NAMES.items()}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")

FLOAT_TYPES = ("F32", "F16", "BF16")  # read directly by the converter's kernels
# quantized types gguf.quants can dequantize; others (IQ*, TQ*, integer tensors) are refused
DEQUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def hf_names(gguf_name: str, shape: tuple[int, ...]) -> dict[str, int | None]:
    """Hugging Face names stored in one GGUF tensor -> their expert index (None: the whole tensor)."""
    match = _LAYER_TENSOR.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        prefix = f"model.layers.{layer}."
        if part in _HF_BY_GGUF_EXPERTS and len(shape) == 3:
            return {f"{prefix}mlp.experts.{e}.{_HF_BY_GGUF_EXPERTS[part]}.{kind}": e for e in range(shape[0])}
        if part in _HF_BY_GGUF_LAYER:
            return {f"{prefix}{_HF_BY_GGUF_LAYER[part]}.{kind}": None}
        return {}
    match = _GLOBAL_TENSOR.match(gguf_name)
    if match and match.group(1) in _HF_BY_GGUF_GLOBAL:
        return {f"{_HF_BY_GGUF_GLOBAL[match.group(1)]}.{match.group(2)}": None}
    return {}


class GGUFCheckpoint:
    """A GGUF file read like a Hugging Face checkpoint folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.folder = self.path  # where the converter's messages say it looked
        self.files = [self.path]
        self.file = _open_gguf(self.path)
        self.arch = self.string("general.architecture")
        if self.arch not in MODEL_TYPE_BY_ARCH:
            raise GGUFError(f"{self.path} holds a {self.arch!r} model; dllama converts GGUF architectures "
                            f"{', '.join(MODEL_TYPE_BY_ARCH)}")
        self._tensors = {t.name: t for t in self.file.tensors}
        self._map = None
        self._permuted: dict[str, int] | None = None
        self.entries = self._hf_entries()
        self.config = self._config()

    looked_in = property(lambda self: f"looked in {self.path}")
    config_source = "the GGUF metadata"
    rows_in_file_order = True  # q/k rows are stored permuted already (module docstring)

    # -- metadata

    def value(self, key: str, default=None):
        return self.file.fields.get(key, default)

    def string(self, key: str) -> str:
        value = self.value(key)
        if not isinstance(value, str):
            raise GGUFError(f"{self.path} lacks the metadata {key}; it is not a complete llama.cpp model file")
        return value

    def arch_value(self, key: str, default=None):
        return self.value(f"{self.arch}.{key}", default)

    def _need(self, key: str, kind: type = int):
        value = self.arch_value(key)
        if value is None:
            raise GGUFError(f"{self.path} lacks the metadata {self.arch}.{key}, which the {self.arch} format needs")
        return self._typed(key, value, kind)

    def _optional(self, key: str, default, kind: type = int):
        value = self.arch_value(key)
        return default if value is None else self._typed(key, value, kind)

    def _typed(self, key: str, value, kind: type):
        """A metadata value of the wanted kind (a float may be stored as any number, an int as any integer)."""
        ok = _is_int(value) if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise GGUFError(f"{self.path} has the metadata {self.arch}.{key} = {value!r:.40}, not "
                            f"{'an integer' if kind is int else 'a number'}; the file is corrupt")
        return kind(value)

    def _config(self) -> dict:
        """A config.json-style dict; head_dim, eps and rope theta always stated, as the header needs them."""
        heads = self._need("attention.head_count")
        dim = self._need("embedding_length")
        head_dim = self._optional("attention.key_length", 0) or (dim // heads if heads > 0 else 0)
        theta = self._optional("rope.freq_base", 10000.0, float)
        tokens = self.value("tokenizer.ggml.tokens")
        embedding = self.entries.get("model.embed_tokens.weight")
        vocab = (self._optional("vocab_size", None) or (len(tokens) if isinstance(tokens, list) else None)
                 or (embedding.shape[0] if embedding else None))
        config = {
            "model_type": MODEL_TYPE_BY_ARCH[self.arch],
            "hidden_size": dim,
            "intermediate_size": self._need("feed_forward_length"),
            "num_hidden_layers": self._need("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._optional("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": self._need("context_length"),
            "rms_norm_eps": self._need("attention.layer_norm_rms_epsilon", float),
            "rope_theta": theta,
            "hidden_act": "silu",
            "tie_word_embeddings": "lm_head.weight" not in self.entries,
            "bos_token_id": self.value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.value("tokenizer.ggml.eos_token_id"),
        }
        if self.arch == "qwen3moe":
            config.update(num_experts=self._need("expert_count"),
                          num_experts_per_tok=self._need("expert_used_count"),
                          moe_intermediate_size=self._need("expert_feed_forward_length"),
                          norm_topk_prob=True)  # llama.cpp's qwen3moe graph renormalises the top-k weights
        scaling = self._rope_scaling(head_dim, theta)
        if scaling:
            config["rope_scaling"] = scaling
        return config

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        kind = self.arch_value("rope.scaling.type")
        if kind not in (None, "none"):
            raise GGUFError(f"{self.path} uses {kind} rope scaling; the distributed-llama format has only llama3 "
                            "scaling")
        if "rope_freqs.weight" not in self._tensors:
            return None
        return llama3_scaling_from_freqs(self.get_gguf("rope_freqs.weight"), head_dim, theta, self.path)

    def header(self, float_type) -> ModelHeader:
        from dllama.checkpoint import header_from_config

        return header_from_config(self.config, float_type, where=str(self.path))

    # -- tensors

    def _hf_entries(self) -> dict[str, TensorEntry]:
        entries = {}
        for tensor in self.file.tensors:
            end = tensor.start + tensor.nbytes
            if end > self.file.size:
                raise GGUFError(f"{self.path} is truncated: tensor {tensor.name} ends past the end of the file; "
                                "download it again")
            shape = tensor.shape
            if len(shape) == 3 and shape[0] > HEADER_LIMITS["n_experts"][1]:
                raise GGUFError(f"{self.path} has tensor {tensor.name} of {shape[0]} experts; the file is corrupt")
            for hf_name, expert in hf_names(tensor.name, shape).items():
                if expert is None:
                    entries[hf_name] = TensorEntry(self.path, tensor.qtype.name, shape, tensor.start, end)
                else:
                    part = tensor.nbytes // shape[0]
                    first = tensor.start + expert * part
                    entries[hf_name] = TensorEntry(self.path, tensor.qtype.name, shape[1:], first, first + part)
        return entries

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 in the Hugging Face layout (dequantized, q/k rows un-permuted)."""
        entry = self.entries.get(name)
        if entry is None:
            raise GGUFError(f"{name} is missing from {self.path}")
        values = dequantize(self.raw(entry), entry.dtype, entry.shape)
        permute_heads = self._rotary_heads().get(name)
        if permute_heads:
            values = unpermute_rotary_rows(values, permute_heads)
        return values

    def get_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Some rows of a matrix as float32 (the whole tensor is dequantized on the way)."""
        return self.get(name)[rows]

    def get_gguf(self, gguf_name: str) -> np.ndarray:
        tensor = self._tensors[gguf_name]
        entry = TensorEntry(self.path, tensor.qtype.name, tensor.shape, tensor.start, tensor.start + tensor.nbytes)
        return dequantize(self.raw(entry), entry.dtype, entry.shape)

    def raw(self, entry: TensorEntry) -> np.ndarray:
        """The stored bytes of an entry (a view of a memory map of the file)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[entry.start:entry.end]

    def _rotary_heads(self) -> dict[str, int]:
        """Tensors whose rows the `.m` (and so llama.cpp) stores rotary-permuted -> heads (the tensor plan's rule)."""
        if self._permuted is None:
            plan = tensor_plan(self.header(FloatType.F32))
            self._permuted = {spec.hf_name: spec.permute_heads for spec in plan if spec.permute_heads}
        return self._permuted

    def release(self) -> None:
        """Drop the memory map so its pages stop counting towards this process."""
        self._map = None


class GGUFFile:
    """A GGUF file's metadata (`fields`: key -> Python value) and tensor infos, read once."""

    def __init__(self, path: Path):
        from gguf import GGUF_DEFAULT_ALIGNMENT

        self.path = path
        self.size = path.stat().st_size
        with open(path, "rb") as f:
            self._buf = f.read(min(self.size, 4 << 20))  # the metadata, before the tensors; grown on demand
        self._pos = 0
        self._read_header()
        self.fields = {}
        for _ in range(self._n_fields):
            key, value = self._field()
            if key in self.fields:
                raise GGUFError(f"{self.path} has the metadata key {key} twice; the file is corrupt")
            self.fields[key] = value
        infos = [self._tensor_info() for _ in range(self._n_tensors)]
        alignment = self.fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not _is_int(alignment) or not 0 < alignment <= 1 << 20 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path} has general.alignment {alignment!r}, not a power of two; the file is corrupt")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(name, qtype, shape, offset, data_start, alignment)
                        for name, qtype, shape, offset in infos]
        self._check_no_overlap()
        self._buf = b""

    def _tensor(self, name: str, qtype, shape: tuple[int, ...], offset: int, data_start: int,
                alignment: int) -> GGUFTensorInfo:
        nbytes = _nbytes(qtype, shape, f"tensor {name} in {self.path}")
        start = data_start + offset
        if offset % alignment or start + nbytes > self.size:
            what = "is misaligned" if offset % alignment else "ends past the end of the file"
            raise GGUFError(f"{self.path} is truncated or corrupt: tensor {name} {what}; download it again")
        return GGUFTensorInfo(name, qtype, shape, start, nbytes)

    def _check_no_overlap(self) -> None:
        names = set()
        end, previous = 0, None
        for t in sorted(self.tensors, key=lambda t: t.start):
            if t.name in names:
                raise GGUFError(f"{self.path} has two tensors named {t.name}; the file is corrupt")
            if t.start < end:
                raise GGUFError(f"{self.path} is corrupt: tensor {t.name} overlaps {previous}; download it again")
            names.add(t.name)
            end, previous = t.start + t.nbytes, t.name

    def _read_header(self) -> None:
        magic = self._buf[:4]
        if magic != b"GGUF":
            raise GGUFError(f"{self.path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                            "use `dllama-convert hf` for a Hugging Face folder")
        _magic, version = self._unpack("<II")
        if version not in (2, 3):
            raise GGUFError(f"{self.path} is GGUF version {version}; dllama reads versions 2 and 3")
        self._n_tensors, self._n_fields = self._unpack("<QQ")
        # each metadata pair takes at least 13 bytes, each tensor info 24: counts beyond that are lies
        if self._n_fields * 13 + self._n_tensors * 24 > self.size - self._pos:
            raise GGUFError(f"{self.path} claims {self._n_tensors} tensors and {self._n_fields} metadata keys, more "
                            f"than its {self.size} bytes can hold; the file is truncated or corrupt")

    def _need(self, n: int) -> None:
        if self._pos + n > len(self._buf):
            if self._pos + n > self.size:  # a corrupt length: refuse before reading (and holding) the file
                raise GGUFError(f"{self.path} is truncated inside its metadata; download it again")
            with open(self.path, "rb") as f:
                self._buf = f.read(min(self.size, max(2 * len(self._buf), self._pos + n)))
            self._need(n)

    def _unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        self._need(n)
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += n
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        self._need(n)
        raw = self._buf[self._pos:self._pos + n]
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _field(self) -> tuple[str, object]:
        key = self._string()
        (vtype,) = self._unpack("<I")
        return key, self._value(vtype)

    def _value(self, vtype: int):
        from gguf import GGUFValueType

        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self._unpack("<IQ")
            self._need(count * _MIN_VALUE_BYTES.get(item_type, 1))  # before a loop or list of `count` items
            if item_type in _SCALAR_FORMATS:  # one unpack for the whole array
                values = list(self._unpack(f"<{count}{_SCALAR_FORMATS[item_type]}"))
                return [bool(v) for v in values] if item_type == GGUFValueType.BOOL else values
            return [self._value(item_type) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise GGUFError(f"{self.path} has a metadata value of unknown type {vtype}; the file is corrupt")
        (value,) = self._unpack("<" + _SCALAR_FORMATS[vtype])
        return bool(value) if vtype == GGUFValueType.BOOL else value

    def _tensor_info(self) -> tuple[str, object, tuple[int, ...], int]:
        from gguf import GGMLQuantizationType

        name = self._string()
        (n_dims,) = self._unpack("<I")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise GGUFError(f"tensor {name} in {self.path} has {n_dims} dimensions (GGUF allows 1 to "
                            f"{GGML_MAX_DIMS}); the file is corrupt")
        dims = self._unpack(f"<{n_dims}Q")
        qtype_id, offset = self._unpack("<IQ")
        try:
            qtype = GGMLQuantizationType(qtype_id)
        except ValueError:
            raise GGUFError(f"tensor {name} in {self.path} has an unknown type {qtype_id}; "
                            "a newer llama.cpp wrote it, or the file is corrupt") from None
        # GGUF lists ne[0] (the row length) first
        return name, qtype, tuple(int(d) for d in reversed(dims)), int(offset)


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q",
                   12: "d"}  # GGUFValueType
_MIN_VALUE_BYTES = {**{t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}, 8: 8, 9: 12}  # string, array
GGML_MAX_DIMS = 4
MAX_TENSOR_VALUES = 1 << 40


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # row-major, as numpy and Hugging Face order it
    start: int  # absolute offset in the file
    nbytes: int


def _nbytes(qtype, shape: tuple[int, ...], what: str) -> int:
    from gguf import GGML_QUANT_SIZES

    block, block_bytes = GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    if not all(shape) or n > MAX_TENSOR_VALUES or shape[-1] % block:
        raise GGUFError(f"{what} has shape {list(shape)}, impossible for {qtype.name} blocks of {block}; "
                        "the file is corrupt")
    return n // block * block_bytes


def _open_gguf(path: Path) -> GGUFFile:
    if not path.is_file():
        raise GGUFError(f"{path} does not exist or is not a file")
    try:
        return GGUFFile(path)
    except (struct.error, OverflowError, RecursionError):
        raise GGUFError(f"{path} is truncated or corrupt in its metadata; download it again") from None


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Stored GGUF bytes of `type_name` -> float32 values of `shape`."""
    if type_name in FLOAT_TYPES:
        return widen_to_float32(raw, type_name, shape)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if type_name not in DEQUANTIZABLE:
        raise GGUFError(f"tensor type {type_name} is not supported; dllama reads "
                        f"{', '.join(FLOAT_TYPES + DEQUANTIZABLE)}")
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType[type_name]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return gguf_dequantize(raw.reshape(rows, -1), qtype).astype(np.float32, copy=False).reshape(shape)


def unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of formats.permute_rotary_rows: adjacent rotary pairs -> Hugging Face's halves."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


LLAMA3_SCALINGS = [  # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) in use
    (8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192),
]


def llama3_freq_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                        original: int) -> np.ndarray:
    """What llama.cpp stores in rope_freqs.weight for llama3 rope scaling (divisors of each frequency)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    return np.where(wavelen < high_wavelen, 1.0,
                    np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))


def llama3_scaling_from_freqs(factors: np.ndarray, head_dim: int, theta: float, path: Path) -> dict:
    """llama.cpp keeps only the per-frequency factors; find the llama3 parameters that give them."""
    for factor, low, high, original in LLAMA3_SCALINGS:
        expected = llama3_freq_factors(head_dim, theta, factor, low, high, original)
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise GGUFError(f"{path} has rope_freqs.weight that matches no known llama3 rope scaling; "
                    "convert the original Hugging Face checkpoint with `dllama-convert hf` instead")
